"""The default strategy (``auto``): ``rerank`` when the bank has a mean image embedding (recorded, or the batch's own
with ``--image-mean batch``), else ``pd``; named in the CLI's output, the results and the API. The rerank
candidates decode in one batch exactly as one by one; the gate scores a bank with only unlabelled images on
their CLIPScore; prefix noise is given as a cosine whatever the width (whether noise helps raw image embeddings decode is
measured by ``benchmarks/noise_sweep.py``: it takes two trainings of 1,000 steps, ~15 minutes, too long for CI)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from decapflow.bank.memory import Registry
from decapflow.caption.captioner import Captioner, Options
from decapflow.caption.modality import CANDIDATES, ImageMean, rows_mean, save_image_mean
from decapflow.cli import main


def record_mean(bank_name: str = "shapes") -> None:
    bank = Registry().open(bank_name)
    save_image_mean(bank_name, ImageMean(rows_mean(bank.vector_cache()[0]), 8, bank.encoder))


def test_auto_runs_pd_without_an_image_mean_and_rerank_with_one(own_home: Path) -> None:
    vectors = np.asarray(Registry().open("shapes").vector_cache()[0][:3])
    plain = Captioner.for_bank("shapes")
    assert plain.options.strategy == "auto" and plain.strategy == "pd"
    assert {c.strategy for c in plain.caption_embeddings(vectors)} == {"pd"}
    record_mean()
    gapped = Captioner.for_bank("shapes")
    assert gapped.strategy == "rerank"
    assert {c.strategy for c in gapped.caption_embeddings(vectors)} == {"rerank"}
    assert Captioner.for_bank("shapes", Options(strategy="pd")).strategy == "pd"  # asked for: kept


def test_the_cli_says_which_strategy_ran(own_home: Path, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import decapflow.caption.files as files

    runner = CliRunner()
    out = runner.invoke(main, ["caption", "--memory", "shapes", str(images), "--format", "jsonl"])
    assert out.exit_code == 0, out.output
    assert "strategy: pd (auto: bank 'shapes' has no mean image embedding" in out.stderr
    assert {json.loads(line)["strategy"] for line in out.stdout.splitlines()} == {"pd"}
    few = runner.invoke(main, ["caption", "--memory", "shapes", str(images), "--image-mean", "batch"])
    assert few.exit_code == 1 and "3 readable file(s) are too few" in few.stderr and "at least 32" in few.stderr
    assert few.stdout == ""  # refused: nothing captioned with the three images' own mean
    monkeypatch.setattr(files, "MIN_BATCH_MEAN", 3)
    batch = runner.invoke(main, ["caption", "--memory", "shapes", str(images), "--format", "jsonl",
                                 "--image-mean", "batch"])
    assert batch.exit_code == 0, batch.output
    assert "strategy: rerank (auto: the mean image embedding of these files, transductive)" in batch.stderr
    assert {json.loads(line)["strategy"] for line in batch.stdout.splitlines()} == {"rerank"}
    record_mean()
    recorded = runner.invoke(main, ["caption", "--memory", "shapes", str(images), "--format", "jsonl"])
    assert "strategy: rerank (auto: bank 'shapes' has a recorded mean image embedding; candidates pd, ms)" in \
        recorded.stderr
    assert {json.loads(line)["strategy"] for line in recorded.stdout.splitlines()} == {"rerank"}


def test_auto_projects_big_banks_onto_their_nearest_rows(own_home: Path, images: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """From TOPK_MIN_ROWS rows auto runs topk (and rerank's projection candidate is topk): on a big bank of
    real geometry the whole-bank softmax blends thousands of sentences (benchmarks/big_world.py)."""
    import decapflow.caption.captioner as captioner_module

    small = Captioner.for_bank("shapes")
    assert small.strategy == "pd" and small.rerank_candidates() == ("pd", "ms")
    monkeypatch.setattr(captioner_module, "TOPK_MIN_ROWS", len(small.vectors))
    big = Captioner.for_bank("shapes")
    assert big.strategy == "topk" and big.rerank_candidates() == ("topk", "ms")
    out = CliRunner().invoke(main, ["caption", "--memory", "shapes", str(images), "--format", "jsonl"])
    assert out.exit_code == 0, out.output
    assert f"strategy: topk (auto: bank 'shapes' has {len(small.vectors):,} rows" in out.stderr
    assert {json.loads(line)["strategy"] for line in out.stdout.splitlines()} == {"topk"}
    record_mean()
    reranked = Captioner.for_bank("shapes")
    assert reranked.strategy == "rerank"
    captions = reranked.caption_embeddings(reranked.encoder.encode_image(
        [Image.open(p).convert("RGB") for p in sorted(images.glob("*.png"))[:4]]))
    assert all(c.strategy == "rerank" and c.support[0][0].split(":")[0] in ("topk", "ms") for c in captions)


def test_the_api_defaults_to_auto_and_names_what_ran(own_home: Path, images: Path, serve_app) -> None:
    record_mean()
    url = serve_app()
    with httpx.Client(base_url=url, timeout=60) as client, (images / "img_000007.png").open("rb") as f:
        response = client.post("/v1/captions", data={"memory": "shapes"}, files=[("images", ("a.png", f))])
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["strategy"] == "rerank"


def test_candidates_decoded_together_give_the_captions_decoded_one_by_one(own_home: Path) -> None:
    record_mean()
    captioner = Captioner.for_bank("shapes", Options(strategy="rerank"))
    rng = np.random.default_rng(0)
    images = np.asarray(Registry().open("shapes").vector_cache()[0][:5]) + rng.normal(0, 0.05, (5, 32))
    images = (images / np.linalg.norm(images, axis=1, keepdims=True)).astype(np.float32)
    prefixes = captioner.candidate_prefixes(images, CANDIDATES)
    together = captioner.decoder.decode_texts(np.concatenate(prefixes), captioner.vocab, batch_size=64)
    one_by_one = [t for p in prefixes for row in p for t in captioner.decoder.decode_texts(row[None], captioner.vocab)]
    assert together == one_by_one
    ranked = captioner._rerank(images)
    by_candidate = [together[c * 5:(c + 1) * 5] for c in range(len(CANDIDATES))]
    assert all(r.caption in {by_candidate[c][b] for c in range(len(CANDIDATES))} for b, r in enumerate(ranked))


def test_a_bank_with_only_unlabelled_images_gates_on_their_clipscore(own_home: Path, images: Path) -> None:
    from decapflow.decoder.registry import decoders
    from decapflow.lifecycle.gate import decide, eval_sets
    from decapflow.lifecycle.training import train_bank

    out = CliRunner().invoke(main, ["memory", "image-mean", "shapes", "--images", str(images)])
    assert out.exit_code == 0, out.output
    assert "the gate scores challengers on 3 of these images (CLIPScore" in out.output
    (domain,) = [s for s in eval_sets("shapes") if s.kind == "domain"]
    weak = train_bank("shapes", "tiny", {"epochs": 1, "max_steps": 1, "batch_size": 8, "val_fraction": 0.0},
                      progress=False, gate=True)
    decision = weak["decision"]
    assert decision["metric"] == "domain.clipscore" and decision["eval_set"] == domain.id
    record = decoders().record("shapes", weak["decoder"])
    scores = record["scores"][domain.id]
    assert scores["strategy"] == "rerank" and 0.0 <= scores["clipscore"] <= 2.5 and scores["n"] == 3
    again = decide("shapes", weak["decoder"], metric="domain.clipscore")  # scored once, then read back
    assert again.challenger_score == pytest.approx(scores["clipscore"])
    listing = CliRunner().invoke(main, ["decoder", "list", "shapes"])
    assert f"decided by domain.clipscore on {domain.id}" in listing.output and "no noise" in listing.output


@pytest.mark.parametrize("dim", [32, 96, 512])
@pytest.mark.parametrize("cosine", [0.9, 0.7, 0.4])
def test_prefix_noise_given_as_a_cosine_lands_at_that_cosine_whatever_the_width(dim: int, cosine: float) -> None:
    from decapflow.decoder.recipe import TrainRecipe, noise_std_for

    std = noise_std_for(TrainRecipe(noise_cos=cosine), dim)
    clean = F.normalize(torch.randn(4000, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    noisy = F.normalize(clean + std * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert float((clean * noisy).sum(-1).mean()) == pytest.approx(cosine, abs=0.02 if dim >= 96 else 0.04)
    assert math.isclose(noise_std_for(TrainRecipe(noise_std=0.1), dim), 0.1)
    with pytest.raises(ValueError, match="not both"):
        TrainRecipe(noise_cos=cosine, noise_std=0.1)


@pytest.mark.slow
@pytest.mark.heavy  # three trainings
def test_the_domain_gate_promotes_the_decoder_that_captions_world_images_better(decapflow_home: Path,
                                                                                tmp_path: Path) -> None:
    """A world bank with only unlabelled images recorded (no annotations): the challenger that names the world
    images' attributes better is promoted on CLIPScore of the default strategy's captions; the weaker one is not."""
    from corpora.world import CORPUS_SEED, UNLABELLED_SEED, make_split, render
    from decapflow.bank.ingest import run_ingest
    from decapflow.caption.modality import record_image_mean
    from decapflow.encoders import load_encoder
    from decapflow.lifecycle.demo import attribute_scores
    from decapflow.lifecycle.gate import add_domain_eval_set
    from decapflow.lifecycle.training import train_bank

    corpus = tmp_path / "world.txt"
    corpus.write_text("".join(texts[0] + "\n" for _, texts in make_split(3000, CORPUS_SEED, n_captions=1)))
    run_ingest(corpus, "w", "world-gap")
    bank, encoder = Registry().open("w"), load_encoder("world-gap")
    unlabelled = [scene for scene, _ in make_split(120, UNLABELLED_SEED, n_captions=1)]
    _, _, vectors = record_image_mean(bank, encoder, [render(s) for s in unlabelled], "world, unlabelled")
    add_domain_eval_set(bank, vectors, "world, unlabelled")

    def attributes(decoder: str) -> float:
        captions = Captioner.for_bank("w", decoder=decoder).caption_embeddings(vectors)
        return attribute_scores({i: c.caption for i, c in enumerate(captions)}, dict(enumerate(unlabelled)))[
            "attr-mean"]

    recipe = {"epochs": 1, "batch_size": 64, "val_fraction": 0.02}
    weak = train_bank("w", "decap-small", {**recipe, "max_steps": 15}, progress=False)  # the first: current
    strong = train_bank("w", "decap-small", {**recipe, "max_steps": 250}, progress=False, gate=True)
    assert strong["decision"]["metric"] == "domain.clipscore" and strong["promoted"], strong["summary"]
    assert attributes(strong["decoder"]) > attributes(weak["decoder"]) + 0.05  # measured 0.58 against 0.49
    worse = train_bank("w", "decap-small", {**recipe, "max_steps": 15, "seed": 1}, progress=False, gate=True)
    assert not worse["promoted"], worse["summary"]
