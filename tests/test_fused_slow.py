"""A retrieval-fused decoder names the attributes of world images better than a plain one trained the same way
(slow: two decap-small trainings on the world-gap CLIP's bank)."""

from __future__ import annotations

from pathlib import Path

import pytest

from decapflow.caption.captioner import Captioner, Options

pytestmark = pytest.mark.slow


def test_a_fused_decoder_names_image_attributes_better_than_a_plain_one(decapflow_home: Path,
                                                                       tmp_path: Path) -> None:
    from corpora.world import CORPUS_SEED, TEST_SEED, make_split, render
    from decapflow.bank.ingest import run_ingest
    from decapflow.encoders import load_encoder
    from decapflow.lifecycle.demo import attribute_scores
    from decapflow.lifecycle.training import train_bank

    corpus = tmp_path / "world.txt"
    corpus.write_text("".join(texts[0] + "\n" for _, texts in make_split(8000, CORPUS_SEED, n_captions=1)))
    run_ingest(corpus, "w", "world-gap")
    scenes = [scene for scene, _ in make_split(64, TEST_SEED, n_captions=1)]
    vectors = load_encoder("world-gap").encode_image([render(s) for s in scenes], 64)
    recipe = {"epochs": 5, "max_steps": 250, "val_fraction": 0.02}

    def attributes(fused: bool) -> float:
        decoder = train_bank("w", "decap-small", recipe, progress=False, fused=fused)["decoder"]
        captioner = Captioner.for_bank("w", Options(), decoder=decoder)  # auto: pd, or fused for a fused decoder
        assert captioner.strategy == ("fused" if fused else "pd")
        captions = captioner.caption_embeddings(vectors)
        return attribute_scores({i: c.caption for i, c in enumerate(captions)}, dict(enumerate(scenes)))["attr-mean"]

    plain, fused = attributes(False), attributes(True)
    assert fused > plain + 0.05, (plain, fused)
