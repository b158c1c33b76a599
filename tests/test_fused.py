"""Retrieval-fused decoders: self-excluding retrieval, the fused prefix, saving and reloading, the ``fused``
strategy through the library, the CLI and the API, ``auto``, and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from decapflow.cli import main
from decapflow.decoder.model import DeCapDecoder, load_config
from decapflow.decoder.retrieval import nearest, self_neighbours


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, list(args))
    if ok:
        assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
    return result


def test_a_caption_never_retrieves_itself_nor_its_near_copies() -> None:
    v = unit(300, 16)
    v[1] = v[0] + 0.01 * unit(1, 16, 1)[0]  # a paraphrase CLIP can hardly tell from row 0
    v[1] /= np.linalg.norm(v[1])
    for noise in (None, 0.9, 0.5):
        table = self_neighbours(v, 5, noise_cos=noise, exclude_cos=None, seed=0)
        assert table.shape == (300, 5) and not (table == np.arange(300)[:, None]).any()
    clean = self_neighbours(v, 5, noise_cos=None, exclude_cos=None, seed=0)
    assert clean[0, 0] == 1  # without the cut, the near-copy comes first
    table = self_neighbours(v, 5, noise_cos=None, exclude_cos=0.97, seed=0)
    assert 1 not in table[0] and 0 not in table[1]
    exact = np.argsort(-(v @ v.T) + np.eye(300) * 10, axis=1)[:, :5]  # brute force, itself last
    np.testing.assert_array_equal(clean[2:], exact[2:])
    again = self_neighbours(v, 5, noise_cos=0.7, exclude_cos=0.97, seed=3)
    np.testing.assert_array_equal(again, self_neighbours(v, 5, noise_cos=0.7, exclude_cos=0.97, seed=3))
    ids, sims = nearest(v[:4], v, 3)
    assert (ids[:, 0] == np.arange(4)).all() and np.allclose(sims[:, 0], 1, atol=1e-5)


@pytest.mark.parametrize("fusion", ["tokens", "xattn"])
def test_the_fused_prefix_shape_and_a_round_trip_through_a_checkpoint(fusion: str, tmp_path: Path) -> None:
    from decapflow.decoder.checkpoint import load_decoder, write_decoder_files
    from decapflow.decoder.vocab import Vocab

    config = replace(load_config("tiny"), prefix_dim=16, neighbors=4, fusion=fusion, vocab_size=50, start_id=48,
                     end_id=49, block_size=40)
    model = DeCapDecoder(config).eval()
    prefix, near = torch.from_numpy(unit(3, 16)), torch.from_numpy(unit(12, 16, 1).reshape(3, 4, 16))
    ids = torch.randint(0, 48, (3, 5))
    positions = 5 if fusion == "tokens" else 1
    assert model.prefix_len() == positions
    assert model(prefix, ids, None, near).shape == (3, positions + 5, 50)
    with pytest.raises(ValueError, match="needs each prefix's neighbours"):
        model(prefix, ids)
    vocab = Vocab.build(np.arange(48).tolist() + [49406, 49407])
    write_decoder_files(tmp_path / "d", model, vocab, {"fused": {"neighbors": 4, "fusion": fusion}})
    again, _, meta = load_decoder(tmp_path / "d")
    assert again.config == config and meta["fused"]["fusion"] == fusion
    np.testing.assert_allclose(again.eval()(prefix, ids, None, near).detach(), model(prefix, ids, None, near).detach(),
                               atol=1e-6)
    greedy = model.generate(prefix, max_len=6, neighbours=near)
    assert greedy == model.generate(prefix, max_len=6, neighbours=near, use_cache=False)
    assert len(model.generate(prefix, max_len=6, beam=3, neighbours=near)) == 3


@pytest.fixture
def fused_home(own_home: Path) -> Path:
    """The trained 'shapes' home plus a tiny fused decoder, made current."""
    from decapflow.decoder.train import TrainRecipe
    from decapflow.lifecycle.training import train_from_bank

    recipe = TrainRecipe(epochs=120, batch_size=8, lr=1e-2, warmup_steps=10, val_fraction=0.0, patience=None,
                         retrieval_noise_cos=0.95)
    train_from_bank("shapes", config="tiny", recipe=recipe, progress=False, fused={"neighbors": 2})
    return own_home


def test_fused_captions_are_the_same_through_library_cli_and_api(fused_home: Path, images: Path,
                                                                  serve_app) -> None:
    import httpx

    from decapflow import caption_images
    from decapflow.decoder.registry import current_meta

    assert current_meta("shapes")["fused"] == {"neighbors": 2, "fusion": "tokens"}
    library = [c.caption for c in caption_images([images], memory="shapes", strategy="fused")]
    out = run("caption", "--memory", "shapes", "--strategy", "fused", "--format", "jsonl", str(images))
    cli = [json.loads(line)["caption"] for line in out.stdout.splitlines()]
    url = serve_app()
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(images.glob("*.png"))]
    answer = httpx.post(f"{url}/v1/captions", data={"memory": "shapes", "strategy": "fused"}, files=files,
                        timeout=60).json()
    api = [r["caption"] for r in answer["results"]]
    assert library == cli == api and all(library)
    assert [r["strategy"] for r in answer["results"]] == ["fused"] * 3
    assert all(len(r["support"]) == 2 for r in answer["results"])  # the two bank rows read beside the query


def test_auto_runs_fused_without_an_image_mean_and_rerank_with_one_and_says_why(fused_home: Path, images: Path) -> None:
    out = run("caption", "--memory", "shapes", "--format", "jsonl", str(images))
    assert "strategy: fused (auto: bank 'shapes''s decoder is retrieval-fused" in out.stderr
    assert {json.loads(line)["strategy"] for line in out.stdout.splitlines()} == {"fused"}
    from decapflow.bank.memory import Registry
    from decapflow.caption.modality import ImageMean, rows_mean, save_image_mean

    bank = Registry().open("shapes")
    save_image_mean("shapes", ImageMean(rows_mean(bank.vector_cache()[0]), 8, bank.encoder))
    out = run("caption", "--memory", "shapes", "--format", "jsonl", str(images))  # with an image mean: rerank
    assert "candidates ms, vd, decoded by its retrieval-fused decoder with 2 bank rows per image" in out.stderr
    assert {json.loads(line)["strategy"] for line in out.stdout.splitlines()} == {"rerank"}
    listed = json.loads(run("decoder", "list", "shapes", "--json").stdout)
    assert [d["fused"] for d in listed] == [None, {"neighbors": 2, "fusion": "tokens"}]
    out = run("caption", "--memory", "shapes", "--neighbours", "3", str(images), ok=False)
    assert out.exit_code == 1 and "trained with 2; it reads at most 2" in out.stderr


def test_fused_on_a_plain_decoder_and_bad_options_are_clear_errors(own_home: Path, images: Path) -> None:
    out = run("caption", "--memory", "shapes", "--strategy", "fused", str(images), ok=False)
    assert out.exit_code == 1 and "needs a retrieval-fused decoder" in out.stderr and "--fused" in out.stderr
    out = run("train", "--memory", "shapes", "--neighbors", "3", "--prefect", "off", ok=False)
    assert out.exit_code == 2 and "go with --fused" in out.stderr


def test_an_entity_prompt_holds_what_most_neighbours_share_and_trains_and_decodes(tmp_path: Path) -> None:
    from decapflow.decoder.checkpoint import load_decoder
    from decapflow.decoder.entities import PROMPT_TOKENS, prompts
    from decapflow.decoder.recipe import TrainRecipe
    from decapflow.decoder.train import train_decoder

    df = np.array([0.9, 0.1, 0.1, 0.05, 0.6, 0.0])  # id 0: a function word; 4: common; 5: the filler
    sets = [[np.array([0, 1, 3]), np.array([0, 1, 4]), np.array([0, 1, 3, 4]), np.array([0, 2])]]
    got = prompts(sets, df, min_count=2, fill=5)
    assert got.shape == (1, PROMPT_TOKENS) and got[0, :2].tolist() == [1, 3] and (got[0, 2:] == 5).all()
    texts = [f"{c} {s} number {i}" for i in range(12) for c in ("red", "blue", "green") for s in ("circle", "box")]
    v = unit(len(texts), 16, 2)
    recipe = TrainRecipe(epochs=2, batch_size=16, val_fraction=0.1, entity_min_count=2, retrieval_noise_cos=0.9)
    result = train_decoder(texts, v, config=replace(load_config("tiny"), neighbors=3), recipe=recipe,
                           out_dir=tmp_path / "run", progress=False, token_cache=False)
    model, vocab, _ = load_decoder(result.best)
    assert model.config.prompt_tokens == PROMPT_TOKENS and float(model.token_df.max()) > 0.9  # <start> is in all
    near, prompt = torch.from_numpy(v[[[1, 2, 3], [0, 2, 3]]]), np.full((2, PROMPT_TOKENS), vocab.end_id)
    assert len(model.decode_texts(v[:2], vocab, neighbours=near, prompt=prompt)) == 2
    with pytest.raises(ValueError, match="entity prompt"):
        model.decode_texts(v[:2], vocab, neighbours=near)
