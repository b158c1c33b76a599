"""The modality gap tools: mean-shift, the recorded image mean, and CLIP re-ranking of candidate captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from decapflow.bank.memory import Registry
from decapflow.bank.rows import BF16Rows
from decapflow.caption.captioner import Captioner, Options
from decapflow.caption.modality import (
    ImageMean,
    blend,
    gap,
    load_image_mean,
    mean_shift,
    rerank,
    rows_mean,
    save_image_mean,
    unit,
)
from decapflow.cli import main
from decapflow.errors import BankError
from decapflow.lifecycle.deletion import delete_bank


def test_mean_shift_moves_an_image_cone_onto_the_text_cone() -> None:
    rng = np.random.default_rng(0)
    texts = unit(rng.standard_normal((500, 16)) * 0.3 + 2.0 * np.eye(16)[0])  # a text cone around e0
    images = unit(rng.standard_normal((500, 16)) * 0.3 + 2.0 * np.eye(16)[1])  # an image cone around e1
    mu_img, mu_txt = images.mean(0), texts.mean(0)
    assert gap(mu_img, mu_txt) > 1.0
    shifted = mean_shift(images, mu_img, mu_txt)
    np.testing.assert_allclose(np.linalg.norm(shifted, axis=1), 1.0, atol=1e-6)
    assert gap(shifted.mean(0), mu_txt) < 0.1  # the shifted images sit in the text cone
    np.testing.assert_allclose(blend(images, shifted, 0.0), images, atol=1e-6)
    np.testing.assert_allclose(blend(images, shifted, 1.0), shifted, atol=1e-6)


def test_rows_mean_streams_float32_and_bfloat16_rows() -> None:
    rows = np.random.default_rng(1).standard_normal((1000, 8)).astype(np.float32)
    np.testing.assert_allclose(rows_mean(rows, chunk_rows=64), rows.mean(0), atol=1e-6)
    np.testing.assert_allclose(rows_mean(BF16Rows(BF16Rows.encode(rows)), chunk_rows=100), rows.mean(0), atol=1e-2)


def test_rerank_picks_the_candidate_whose_text_embedding_is_closest() -> None:
    images = unit(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    candidates = unit(np.array([[[0.2, 1.0, 0.0], [1.0, 0.3, 0.0], [1.0, 0.3, 0.0]],
                                [[0.0, 1.0, 0.1], [0.0, 1.0, 0.1], [1.0, 0.0, 0.0]]]))
    best, scores = rerank(images, candidates)
    assert best.tolist() == [1, 0]  # the first of two equal candidates wins
    assert scores.shape == (2, 3) and scores[1, 2] == pytest.approx(0.0, abs=1e-6)


def test_ms_and_rerank_need_a_recorded_image_mean_and_use_it(own_home: Path) -> None:
    bank = Registry().open("shapes")
    vectors, texts = bank.vector_cache()
    for strategy in ("ms", "rerank"):
        with pytest.raises(BankError, match="decapflow memory image-mean shapes --images"):
            Captioner.for_bank("shapes", Options(strategy=strategy)).caption_embeddings(np.asarray(vectors[:2]))
    # An "image mean" equal to the bank's own mean: mean-shift is then the identity, so ms decodes the bank rows.
    save_image_mean("shapes", ImageMean(rows_mean(vectors), 8, bank.encoder))
    ms = Captioner.for_bank("shapes", Options(strategy="ms"))
    assert ms.image_mean is not None and ms.image_mean.images == 8
    np.testing.assert_allclose(ms.prefixes(np.asarray(vectors))[0], np.asarray(vectors), atol=1e-5)
    ranked = Captioner.for_bank("shapes", Options(strategy="rerank", n_support=6)).caption_embeddings(
        np.asarray(vectors))
    exact = np.mean([c.caption == t.as_py() for c, t in zip(ranked, texts, strict=True)])
    assert exact >= 0.75 and all(c.strategy == "rerank" for c in ranked)
    first = ranked[0].support  # every candidate, best first, named by where it came from
    assert [s for _, s in first] == sorted((s for _, s in first), reverse=True)
    assert {name.split(":")[0] for name, _ in first} == {"pd", "ms"}
    six = Captioner.for_bank("shapes", Options(strategy="rerank", n_support=6))._rerank(
        np.asarray(vectors[:2]), ("pd", "nnd", "ms", "pd+ms0.5", "vd", "clipre"))
    assert {name.split(":")[0] for name, _ in six[0].support} == {"pd", "nnd", "ms", "pd+ms0.5", "vd", "clipre"}
    assert six[1].support[0][0].split(": ", 1)[1] == six[1].caption
    assert ranked[0].caption == first[0][0].split(": ", 1)[1]


def test_image_mean_command_records_it_and_bank_removal_drops_it(own_home: Path, images: Path) -> None:
    out = CliRunner().invoke(main, ["memory", "image-mean", "shapes", "--images", str(images)])
    assert out.exit_code == 0, out.output
    assert "mean image embedding of 3 images recorded" in out.output and "modality gap" in out.output
    bank = Registry().open("shapes")
    mean = load_image_mean("shapes", bank.encoder)
    assert mean is not None and mean.images == 3 and mean.vector.shape == (bank.dim,)
    with pytest.raises(BankError, match="recorded with encoder"):
        load_image_mean("shapes", "another-encoder")
    assert delete_bank("shapes")["image_mean"] == 1
    assert load_image_mean("shapes", bank.encoder) is None
