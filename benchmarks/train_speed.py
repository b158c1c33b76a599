"""Training throughput of ``train_decoder`` against a minimal hand-written loop (same model, batches, data).

Both train the same architecture from the same seed on the same synthetic sentences with the same batch size,
for the same number of optimizer steps, in this process (run them on a quiet machine; one thread by default).
The hand-written loop is the floor of what a training step costs: prebuilt padded batches, AdamW, forward,
label-smoothed cross-entropy, backward, step; no validation, checkpoints, logging or progress bar.
``train_decoder`` is timed end to end (tokenising, validation, a checkpoint per epoch included).

    .venv/bin/python benchmarks/train_speed.py --config decap-small --n 2000 --epochs 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from decapflow.decoder import TrainRecipe, Vocab, build_decoder, tokenize, train_decoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reconstruction import sentences  # noqa: E402


def unit_vectors(n: int, d: int) -> np.ndarray:
    v = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def minimal_loop(texts: list[str], vectors: np.ndarray, config: str, recipe: TrainRecipe, steps: int) -> float:
    """Tokens/s of a bare training loop over prebuilt padded batches."""
    rows = tokenize(texts, recipe.max_tokens)
    vocab = Vocab.build(np.concatenate(rows))
    torch.manual_seed(0)
    model = build_decoder(config, vocab, prefix_dim=vectors.shape[1]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    batches = []
    order = np.random.default_rng(0).permutation(len(rows))
    for i in range(0, len(rows), recipe.batch_size):
        idx = order[i : i + recipe.batch_size]
        L = max(len(rows[j]) for j in idx)
        ids = torch.full((len(idx), L), -100, dtype=torch.long)
        for k, j in enumerate(idx):
            ids[k, : len(rows[j])] = torch.from_numpy(vocab.to_compact(rows[j]))
        batches.append((torch.from_numpy(vectors[idx]), ids[:, :-1].clamp(min=0), ids[:, 1:]))
    tokens, start = 0, time.perf_counter()
    for step in range(steps):
        prefix, inputs, targets = batches[step % len(batches)]
        logits = model(prefix, inputs)[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tokens += int((targets != -100).sum())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="decap-small")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=TrainRecipe().batch_size)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = sentences(args.n)
    vectors = unit_vectors(args.n, args.dim)
    recipe = replace(TrainRecipe(), epochs=args.epochs, batch_size=args.batch_size, device="cpu",
                     num_threads=args.threads, val_fraction=0.05, patience=None, amp="off")
    ours = {amp: ours_tokens_per_s(texts, vectors, args.config, replace(recipe, amp=amp)) for amp in ("off", "auto")}
    floor = minimal_loop(texts, vectors, args.config, recipe, ours["off"][2])
    print(f"{args.config}, {args.n} sentences, batch {args.batch_size}, {ours['off'][2]} steps, "
          f"{args.threads} thread(s)")
    print(f"minimal loop (float32)        : {floor:8.0f} tokens/s")
    for amp, (steps_rate, wall_rate, _) in ours.items():
        label = "float32" if amp == "off" else "amp=auto"
        print(f"train_decoder {label:9s} steps : {steps_rate:8.0f} tokens/s  ({steps_rate / floor:.2f}×)")
        print(f"train_decoder {label:9s} wall  : {wall_rate:8.0f} tokens/s  ({wall_rate / floor:.2f}×, incl. "
              "tokenising, validation, checkpoints)")


def ours_tokens_per_s(texts: list[str], vectors: np.ndarray, config: str,
                      recipe: TrainRecipe) -> tuple[float, float, int]:
    """(tokens/s over the training steps, tokens/s over the whole call, steps) of ``train_decoder``."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = train_decoder(texts, vectors, config=config, recipe=recipe, out_dir=Path(tmp),
                               progress=False, token_cache=False)
        wall = time.perf_counter() - start
    tokens = sum(h["tokens_per_s"] * h["seconds"] for h in result.history)
    return tokens / sum(h["seconds"] for h in result.history), tokens / wall, result.steps


if __name__ == "__main__":
    main()
