from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from decapflow.bank.ingest import run_ingest
from decapflow.bank.memory import Registry
from decapflow.caption.captioner import Captioner, Options, resolve_decoder
from decapflow.caption.files import caption_paths
from decapflow.caption.images import collect_paths, load_image, trailing_int
from decapflow.cli import main


def test_decoder_rebuilds_bank_sentences_from_their_vectors(home: Path) -> None:
    captioner = Captioner.for_bank("shapes", Options(strategy="nnd"))
    vectors, texts = Registry().open("shapes").vector_cache()
    captions = captioner.caption_embeddings(np.asarray(vectors))
    exact = np.mean([c.caption == t.as_py() for c, t in zip(captions, texts, strict=True)])
    assert exact >= 0.75, [c.caption for c in captions]


def test_strategies_agree_where_the_maths_says_they_must(home: Path) -> None:
    vectors, texts = Registry().open("shapes").vector_cache()
    query = np.asarray(vectors[2:3])  # an "image" embedding equal to a bank sentence's
    pd = Captioner.for_bank("shapes", Options(strategy="pd", tau=1e-4))
    prefixes, support = pd.prefixes(query)
    np.testing.assert_allclose(prefixes, query, atol=1e-4)  # a sharp softmax lands on that sentence
    assert support[0][0] == (texts[2].as_py(), pytest.approx(1.0, abs=1e-3))
    clipre = Captioner.for_bank("shapes", Options(strategy="clipre")).caption_embeddings(query)
    assert clipre[0].caption == texts[2].as_py() and clipre[0].strategy == "clipre"
    soft = Captioner.for_bank("shapes", Options(strategy="pd", tau=0.5))
    full = Captioner.for_bank("shapes", Options(strategy="topk", tau=0.5, k=len(vectors)))
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, vectors.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(full.prefixes(q)[0], soft.prefixes(q)[0], atol=1e-5)
    vd = Captioner.for_bank("shapes", Options(strategy="vd")).prefixes(q)[0]
    np.testing.assert_allclose(vd, q, atol=1e-6)
    weights = [w for _, w in soft.prefixes(q)[1][0]]
    assert weights == sorted(weights, reverse=True) and sum(weights) <= 1.0 + 1e-6


def test_caption_images_every_strategy(home: Path, images: Path) -> None:
    paths = collect_paths([images])
    for strategy in ("pd", "topk", "nnd", "vd", "clipre"):
        captioner = Captioner.for_bank("shapes", Options(strategy=strategy, n_support=2))
        captions, failures = caption_paths(captioner, paths)
        assert not failures and len(captions) == 3
        assert all(c.caption and c.strategy == strategy and c.image for c in captions)
        assert all(1 <= len(c.support) <= 2 for c in captions)


def test_no_decoder_is_a_clear_error(tmp_path: Path, tiny_encoder_spec: str) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("a cat\na dog\n")
    run_ingest(corpus, "fresh", tiny_encoder_spec)
    with pytest.raises(ValueError, match="decapflow train --memory fresh"):
        resolve_decoder("fresh", None)
    assert Captioner.for_bank("fresh", Options(strategy="clipre")).decoder is None  # retrieval needs none


def test_images_found_and_unsafe_ones_refused(tmp_path: Path, images: Path) -> None:
    (images / "notes.txt").write_text("not an image")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    paths = collect_paths([images, str(images / "*.png")])
    assert [p.name for p in paths] == ["broken.jpg", "img_000007.png", "img_000008.png", "img_000009.png"]
    assert load_image(paths[0]).reason.startswith(("UnidentifiedImageError", "OSError"))
    big = load_image(paths[1], max_pixels=100)
    assert "exceeds" in big.reason
    assert load_image(paths[1]).size == (48, 40)
    assert trailing_int("COCO_val2014_000000391895.jpg") == 391895 and trailing_int("x.png") is None
    with pytest.raises(FileNotFoundError):
        collect_paths([tmp_path / "missing"])


def test_caption_cli_formats_and_failures(home: Path, images: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    text = runner.invoke(main, ["caption", "--memory", "shapes", str(images)])
    assert text.exit_code == 0, text.output
    lines = text.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(str(images / "img_000007.png") + "\t")
    out = tmp_path / "res.json"
    coco = runner.invoke(main, ["caption", "-m", "shapes", str(images), "--format", "coco", "-o", str(out)])
    assert coco.exit_code == 0, coco.output
    assert sorted(r["image_id"] for r in json.loads(out.read_text())) == [7, 8, 9]
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps({"images": [{"id": 100 + i, "file_name": f"img_{i + 7:06d}.png"}
                                                  for i in range(3)]}))
    coco2 = runner.invoke(main, ["caption", "-m", "shapes", str(images), "--format", "coco",
                                 "--annotations", str(annotations)])
    assert sorted(r["image_id"] for r in json.loads(coco2.stdout)) == [100, 101, 102]
    (images / "broken.png").write_bytes(b"garbage")
    jsonl = runner.invoke(main, ["caption", "-m", "shapes", str(images), "--format", "jsonl", "--strategy", "nnd"])
    assert jsonl.exit_code == 3 and "skipped" in jsonl.stderr and "broken.png" in jsonl.stderr
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert len(rows) == 3 and rows[0]["strategy"] == "nnd" and rows[0]["support"]
    missing = runner.invoke(main, ["caption", "-m", "nope", str(images)])
    assert missing.exit_code == 1 and "no memory bank named 'nope'" in missing.output


def test_decoder_list_cli(home: Path) -> None:
    rows = json.loads(CliRunner().invoke(main, ["decoder", "list", "shapes", "--json"]).stdout)
    assert len(rows) == 1 and rows[0]["current"] and rows[0]["bank"] == "shapes"
    assert rows[0]["encoder"] == Registry().open("shapes").encoder


def test_topk_over_the_ann_index_matches_exact_topk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large banks take topk's neighbours from the in-process IVF (built on first use, kept per bank version)."""
    from datetime import datetime, timezone

    import decapflow.caption.captioner as captioner_module
    from decapflow.decoder.model import build_decoder
    from decapflow.decoder.vocab import Vocab

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 32)).astype(np.float32)
    vectors = centres[rng.integers(0, 50, 6000)] + 0.3 * rng.standard_normal((6000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    bank = Registry().create("big", "e", 32)
    bank.add([str(i) for i in range(6000)], [f"s{i}" for i in range(6000)], vectors, "x", datetime.now(timezone.utc))
    vocab = Vocab.build([320, 1929])
    decoder = build_decoder("tiny", vocab, prefix_dim=32)
    queries = vectors[:8] + 0.05 * rng.standard_normal((8, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    options = Options(strategy="topk", k=64, tau=0.05)
    exact, _ = Captioner(None, bank, decoder, vocab, options).prefixes(queries)  # small bank: exact top-k
    monkeypatch.setattr(captioner_module, "ANN_MIN_ROWS", 1000)
    ann, support = Captioner(None, bank, decoder, vocab, options).prefixes(queries)
    assert bank.has_ivf() and not bank.has_index()  # the in-process IVF, built on first use
    assert (np.sum(ann * exact, axis=1) > 0.99).all()
    assert all(s and s[0][0].startswith("s") for s in support)


def test_bfloat16_bank_copy_gives_the_same_captions(home: Path, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """precision="auto" switches big banks to the bfloat16 copy; the captions and support stay the same."""
    import decapflow.caption.captioner as captioner_module
    from decapflow.bank.rows import BF16Rows

    full = Captioner.for_bank("shapes", Options(strategy="pd"), precision="float32")
    assert full.precision == "float32" and Captioner.for_bank("shapes").precision == "float32"  # small: auto keeps f32
    monkeypatch.setattr(captioner_module, "BF16_MIN_BYTES", 1)
    half = Captioner.for_bank("shapes", Options(strategy="pd"))
    assert half.precision == "bfloat16" and isinstance(half.vectors, BF16Rows)
    pil = [load_image(p) for p in sorted(images.iterdir())]
    for strategy in ("pd", "topk", "nnd", "clipre"):
        a = full.with_options(Options(strategy=strategy, k=4)).caption(pil)
        b = half.with_options(Options(strategy=strategy, k=4)).caption(pil)
        assert [c.caption for c in a] == [c.caption for c in b], strategy
        assert [c.support[0][0] for c in a] == [c.support[0][0] for c in b], strategy
    with pytest.raises(ValueError, match="precision"):
        Captioner.for_bank("shapes", precision="float16")
