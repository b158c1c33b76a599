"""Text-only decoder training: reconstruction, determinism, resume, early stopping, outputs on disk."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from decapflow.decoder.checkpoint import load_decoder
from decapflow.decoder.model import load_config
from decapflow.decoder.train import TrainRecipe, lr_at, train_decoder, use_bf16
from decapflow.decoder.vocab import Captions, Vocab, prepare

COLOURS = ["red", "blue", "green", "small", "big", "old", "young", "white", "black", "brown"]
THINGS = ["dog", "cat", "man", "woman", "bird", "horse", "boy", "girl", "car", "train"]
ACTS = ["sitting", "running", "standing", "sleeping", "eating"]
PLACES = ["beach", "grass", "street", "table", "bed", "road", "field", "bench", "snow", "water"]
SENTENCES = [f"a {COLOURS[i % 10]} {THINGS[(3 * i) % 10]} is {ACTS[i % 5]} on the {PLACES[(7 * i + 2) % 10]}."
             for i in range(20)]
FAST = TrainRecipe(epochs=4, batch_size=8, lr=1e-2, warmup_steps=5, label_smoothing=0.0, val_fraction=0.1,
                   patience=None, device="cpu", num_threads=1)



def unit_vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def corpus(repeat: int = 1) -> tuple[list[str], np.ndarray]:
    """20 sentences with random unit prefixes; ``repeat`` copies make longer epochs (less per-epoch work)."""
    return SENTENCES * repeat, np.tile(unit_vectors(len(SENTENCES)), (repeat, 1))


def train(tmp_path: Path, name: str, recipe: TrainRecipe = FAST, repeat: int = 2, **kw):
    texts, vectors = corpus(repeat)
    config = kw.pop("config", "tiny")
    return train_decoder(texts, vectors, config=config, recipe=recipe, out_dir=tmp_path / name, progress=False,
                         **kw)


def exact_match(folder: Path) -> float:
    model, vocab, _ = load_decoder(folder)
    decoded = model.decode_texts(unit_vectors(len(SENTENCES)), vocab)
    return float(np.mean([d == s for d, s in zip(decoded, SENTENCES, strict=True)]))


def test_tiny_decoder_learns_to_reconstruct(tmp_path: Path) -> None:
    # 20 sentences × 8 copies, 6 epochs of 18 steps: ~1 s on one core (robust over seeds 0-3)
    result = train(tmp_path, "run", replace(FAST, epochs=6, lr=2e-2), repeat=8)
    assert result.steps == 6 * 18
    assert result.history[-1]["train_loss"] < 0.3 < result.history[0]["train_loss"]
    assert exact_match(result.last) >= 0.9


@pytest.mark.slow
def test_reconstruction_without_duplicates(tmp_path: Path) -> None:
    # the brief's setting: ~20 distinct sentences, a few hundred steps (one sentence held out for validation)
    result = train(tmp_path, "run", replace(FAST, epochs=100, batch_size=4, val_fraction=0.05), repeat=1)
    assert result.steps == 500
    assert exact_match(result.last) >= 0.9


def test_outputs_on_disk(tmp_path: Path) -> None:
    seen: list[dict] = []
    result = train(tmp_path, "run", meta={"bank": "demo", "encoder": "tiny:random"}, on_epoch=seen.append)
    lines = [json.loads(x) for x in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == FAST.epochs == len(seen) and lines == result.history == seen
    assert {"train_loss", "val_loss", "val_acc", "tokens_per_s", "lr", "step"} <= set(lines[0])
    assert (result.out_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    model, vocab, meta = load_decoder(result.best)
    assert meta["bank"] == "demo" and meta["recipe"]["lr"] == FAST.lr and meta["best_epoch"] == result.best_epoch
    assert model.config.vocab_size == len(vocab) < 60  # compact: only the ids of these sentences
    assert (result.last / "train_state.pt").is_file() and not (result.best / "train_state.pt").exists()
    assert result.best_val_loss == min(h["val_loss"] for h in lines)


def test_same_seed_same_losses(tmp_path: Path) -> None:
    recipe = replace(FAST, epochs=2, noise_std=0.1)
    a, b = train(tmp_path, "a", recipe), train(tmp_path, "b", recipe)
    losses = [(h["train_loss"], h["val_loss"]) for h in a.history]
    assert losses == [(h["train_loss"], h["val_loss"]) for h in b.history]
    c = train(tmp_path, "c", replace(recipe, seed=1))
    assert losses != [(h["train_loss"], h["val_loss"]) for h in c.history]


class Interrupted(Exception):
    pass


def stop_after_first_epoch(metrics: dict) -> None:
    if metrics["epoch"] == 1:
        raise Interrupted


def test_resume_continues_exactly(tmp_path: Path) -> None:
    # dropout and prefix noise on, so the restored RNG state matters
    config = replace(load_config("tiny"), dropout=0.2)
    recipe = replace(FAST, epochs=3, noise_std=0.05)
    whole = train(tmp_path, "whole", recipe, config=config)
    with pytest.raises(Interrupted):
        train(tmp_path, "split", recipe, config=config, on_epoch=stop_after_first_epoch)
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 1
    resumed = train(tmp_path, "split", recipe, config=config, resume=True)
    keys = ("epoch", "step", "train_loss", "val_loss", "val_acc", "lr")
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in whole.history]
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 3
    again = train(tmp_path, "split", recipe, config=config, resume=True)  # finished: nothing more to do
    assert again.steps == whole.steps and len(again.history) == 3
    with pytest.raises(ValueError, match="other texts"):
        train_decoder(SENTENCES[:10], unit_vectors(10), config=config, recipe=recipe,
                      out_dir=tmp_path / "split", resume=True, progress=False)


def test_early_stopping_and_max_steps(tmp_path: Path) -> None:
    frozen = train(tmp_path, "frozen", replace(FAST, lr=0.0, epochs=10, patience=2))
    assert frozen.stopped_early and len(frozen.history) == 3 and frozen.best_epoch == 1
    capped = train(tmp_path, "capped", replace(FAST, epochs=10, max_steps=7))
    assert capped.steps == 7 and len(capped.history) == 2


def test_learning_rate_schedule() -> None:
    recipe = TrainRecipe(lr=1.0, warmup_steps=10)
    assert lr_at(0, recipe, 110) == pytest.approx(0.1)
    assert lr_at(9, recipe, 110) == pytest.approx(1.0)
    assert lr_at(60, recipe, 110) == pytest.approx(0.5)
    assert lr_at(110, recipe, 110) == 0.0
    paper = TrainRecipe.paper()
    assert (paper.lr, paper.warmup_steps, paper.batch_size, paper.epochs) == (1e-5, 1000, 128, 10)


def test_batches_pad_to_longest_and_tokens_are_cached(tmp_path: Path) -> None:
    texts = ["a dog", "a red dog runs", "cat"]
    data, vocab = prepare(texts, unit_vectors(3), max_tokens=20, cache=tmp_path / "tok")
    assert isinstance(data, Captions) and isinstance(vocab, Vocab)
    prefix, inputs, targets = data.batch(np.array([0, 1]))
    assert prefix.shape == (2, 16) and inputs.shape == targets.shape == (2, 5)  # <start> a red dog runs <end>
    assert targets[0].tolist()[2:] == [vocab.end_id, -100, -100]
    assert inputs[0, 0] == vocab.start_id and torch.allclose(prefix.norm(dim=-1), torch.ones(2))
    assert len(list((tmp_path / "tok").glob("*.npz"))) == 1
    again, _ = prepare(texts, unit_vectors(3), max_tokens=20, cache=tmp_path / "tok")
    assert np.array_equal(again.flat, data.flat)
    with pytest.raises(ValueError, match="one vector per text"):
        prepare(texts, unit_vectors(2), max_tokens=20, cache=None)


def test_mixed_precision_choice() -> None:
    cpu, big, small = torch.device("cpu"), load_config("decap-small"), load_config("tiny")
    assert use_bf16("bf16", cpu, small) and not use_bf16("off", torch.device("cuda"), big)
    assert use_bf16("auto", torch.device("cuda"), small)
    assert not use_bf16("auto", cpu, small)  # casts cost more than they save on a 32-wide model
    with pytest.raises(ValueError, match="recipe.amp"):
        use_bf16("fp16", cpu, big)
