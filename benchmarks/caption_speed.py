"""Captioning speed (issue 4): ``Captioner.caption_embeddings`` against DeCap's official decoding loop, same run.

Everything after the image encoder is timed: projection of the image embeddings onto the memory bank (``pd``,
tau 0.01), greedy decoding to 30 tokens, and turning ids into text. Both sides use the same bank, the same
``decap-base`` weights (random: only speed is measured) and the same image embeddings.

* ``official``: the way the DeCap code decodes, one image at a time: ``sim = v @ M.T``,
  ``softmax(sim / tau) @ M``, normalise (plain torch, the whole bank), then 30 steps that each re-run the
  whole sequence (no key/value cache) and keep the argmax of the last position's softmax. The official
  model predicts ``<start>`` from the prefix; ours is fed it, so both loops here start from
  ``[prefix, <start>]`` and generate the same 30 tokens.
* ``official-full-vocab``: the same loop with the full CLIP vocabulary (49,408 ids, ``Vocab.identity()``),
  as the official checkpoints have: what the compact vocabulary contributes.
* ``ours``: ``Captioner(..., Options(strategy="pd", batch_size=b)).caption_embeddings`` on slices of b
  images (b = 1, 16, 64): streaming projection, then batched, KV-cached greedy decoding, compact vocabulary.
  ``--beam 3`` adds beam search at the largest batch size (not the same work as greedy; for scale).

The bank is a real one: ``--corpus`` (default: the synthetic world corpus, 21k distinct lines) ingested with
``--encoder`` (default ``world``, the tiny offline CLIP) into a temporary ``DECAPFLOW_HOME``. The images are
world scenes rendered and embedded by that CLIP (``--inputs world``) or random unit vectors
(``--inputs random``). The decoder's vocabulary is built from the bank's texts. The random decoder's end
token gets a zero embedding row (``--allow-end`` keeps it): its logit is then always 0 while the best of the
others is positive, so every caption runs the full 30 tokens on both sides; the mean generated lengths are
printed. ``same_captions`` is the share of images whose caption from ``ours`` equals the official loop's.

Output: one JSON line per timed path, then a summary line with the ratios against ``official``.

    .venv/bin/python benchmarks/caption_speed.py            # 64 images on every path (a few minutes)
    .venv/bin/python benchmarks/caption_speed.py --quick    # fewer images on the slow paths (< 60 s)

Run on a quiet machine with one thread (``--threads``; on 2 shared cores torch threads can spin 10x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

WORLD_CORPUS = ROOT / "corpora" / "world" / "corpus.txt.gz"


# ------------------------------------------------------------------------------------------------- setup


def build_bank(corpus: Path, encoder: str) -> tuple[object, object]:
    """Ingest ``corpus`` into bank ``bench`` (in the current ``DECAPFLOW_HOME``); returns (bank, encoder)."""
    from decapflow.bank.ingest import run_ingest
    from decapflow.bank.memory import Registry
    from decapflow.encoders import load_encoder

    run_ingest(corpus, "bench", encoder)
    bank = Registry().open("bench")
    return bank, load_encoder(bank.encoder, "cpu")


def image_embeddings(kind: str, n: int, encoder, dim: int, seed: int) -> np.ndarray:
    """[n, dim] unit image embeddings: rendered world scenes through the CLIP, or random unit vectors."""
    if kind == "random":
        v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    from corpora import world

    scenes = [world.sample_scene(random.Random(world.scene_seed(world.TEST_SEED, i))) for i in range(n)]
    return encoder.encode_image([world.render(s) for s in scenes])


def bank_vocab(texts: list[str]):
    """The compact vocabulary of the CLIP ids in the bank's texts."""
    from decapflow.decoder import Vocab, tokenize

    return Vocab.build(np.concatenate([np.asarray(r) for r in tokenize(texts)]))


def random_decoder(vocab, prefix_dim: int, config: str, seed: int, allow_end: bool):
    """A ``config`` decoder with seeded random weights; unless ``allow_end``, it never emits ``<end>``."""
    from decapflow.decoder import build_decoder

    torch.manual_seed(seed)
    model = build_decoder(config, vocab, prefix_dim=prefix_dim).eval()
    if not allow_end:
        with torch.no_grad():
            model.wte.weight[model.config.end_id] = 0.0  # tied output layer: the <end> logit is always 0
    return model


# ----------------------------------------------------------------------------------------------- the paths


@torch.no_grad()
def official_loop(decoder, vocab, bank: torch.Tensor, images: np.ndarray, tau: float, max_len: int
                  ) -> tuple[list[str], list[int]]:
    """DeCap's inference as its code writes it: per image, dense torch projection, then ``max_len`` steps
    that re-run the whole sequence and take the argmax of the last position's softmax.

    ``bank``: [N, D] float32 tensor. Returns (captions, generated lengths)."""
    cfg = decoder.config
    texts, lengths = [], []
    for v in torch.from_numpy(images):  # [D]
        sim = torch.softmax((v[None] @ bank.T) / tau, dim=-1)  # [1, N]
        v_proj = torch.nn.functional.normalize(sim @ bank, dim=-1)  # [1, D]
        seq = torch.tensor([[cfg.start_id]])  # [1, 1 + t]
        tokens: list[int] = []
        for _ in range(max_len):
            logits = decoder(v_proj, seq)[:, -1]  # [1, V]: the whole sequence again, no cache
            nxt = int(torch.softmax(logits, dim=-1).argmax(-1))
            if nxt == cfg.end_id:
                break
            tokens.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        texts.append(vocab.decode(tokens))
        lengths.append(len(tokens))
    return texts, lengths


def ours(captioner, images: np.ndarray, batch: int) -> list[str]:
    """``caption_embeddings`` on consecutive slices of ``batch`` images (as a caller with b images at a time)."""
    texts: list[str] = []
    for start in range(0, len(images), batch):
        texts.extend(c.caption for c in captioner.caption_embeddings(images[start : start + batch]))
    return texts


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def line(path: str, images: int, seconds: float, **extra: object) -> dict:
    row = {"path": path, "images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 3),
           **extra}
    print(json.dumps(row), flush=True)
    return row


# -------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> None:
    from decapflow.caption.captioner import Captioner, Options
    from decapflow.decoder import Vocab

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DECAPFLOW_HOME"] = tmp
        (bank, encoder), ingest_s = timed(lambda: build_bank(args.corpus, args.encoder))
        vectors, texts = bank.vector_cache()
        vocab = bank_vocab(texts.to_pylist())
        images = image_embeddings(args.inputs, args.images, encoder, bank.dim, args.seed)
        print(json.dumps({"setup": {"bank_rows": len(vectors), "dim": bank.dim, "encoder": bank.encoder,
                                    "ingest_s": round(ingest_s, 1), "vocab": len(vocab), "config": args.config,
                                    "inputs": args.inputs, "threads": torch.get_num_threads(),
                                    "max_len": args.max_len, "tau": args.tau, "end_allowed": args.allow_end}}),
              flush=True)
        decoder = random_decoder(vocab, bank.dim, args.config, args.seed, args.allow_end)
        M = torch.from_numpy(np.array(vectors))  # [N, D] in RAM for the dense baseline

        def baseline(model, voc, n):
            official_loop(model, voc, M, images[:1], args.tau, 2)  # warm-up
            return timed(lambda: official_loop(model, voc, M, images[:n], args.tau, args.max_len))

        n_off = min(args.baseline_images or args.images, args.images)
        (off_texts, off_len), off_s = baseline(decoder, vocab, n_off)
        official = line("official", n_off, off_s, vocab=len(vocab), mean_tokens=float(np.mean(off_len)))

        full = None
        if args.full_vocab_images:
            big = random_decoder(Vocab.identity(), bank.dim, args.config, args.seed, args.allow_end)
            n_full = min(args.full_vocab_images, args.images)
            (_, full_len), full_s = baseline(big, Vocab.identity(), n_full)
            full = line("official-full-vocab", n_full, full_s, vocab=len(Vocab.identity()),
                        mean_tokens=float(np.mean(full_len)))
            del big

        rows = {}
        for b in args.batch_sizes:
            cap = Captioner(encoder, bank, decoder, vocab, Options(strategy="pd", tau=args.tau,
                                                                    max_len=args.max_len, batch_size=b))
            ours(cap, images[:b], b)  # warm-up
            n = min(args.images, args.batch1_images) if b == 1 and args.batch1_images else args.images
            got, seconds = timed(lambda cap=cap, n=n, b=b: ours(cap, images[:n], b))
            same = float(np.mean([a == o for a, o in zip(got[:n_off], off_texts, strict=False)]))
            prefixes, _ = cap.prefixes(images[:n])  # untimed: the ids behind the captions, for their length
            lengths = [len(r) for r in decoder.generate(prefixes, args.max_len)]
            rows[b] = line("ours", n, seconds, batch_size=b, vocab=len(vocab), mean_tokens=float(np.mean(lengths)),
                           same_captions=round(same, 3))
        if args.beam > 1:
            b = max(args.batch_sizes)
            cap = Captioner(encoder, bank, decoder, vocab, Options(strategy="pd", tau=args.tau, max_len=args.max_len,
                                                                    batch_size=b, beam=args.beam))
            ours(cap, images[:2], b)  # warm-up
            _, seconds = timed(lambda: ours(cap, images, b))
            rows[f"beam{args.beam}"] = line("ours", len(images), seconds, batch_size=b, beam=args.beam)

    base = official["images_per_s"]
    summary = {f"speedup_batch{b}": round(r["images_per_s"] / base, 1) for b, r in rows.items() if isinstance(b, int)}
    if f"beam{args.beam}" in rows:
        summary[f"speedup_beam{args.beam}"] = round(rows[f"beam{args.beam}"]["images_per_s"] / base, 1)
    if full is not None:
        summary["compact_vs_full_vocab_official"] = round(base / full["images_per_s"], 1)
        summary["speedup_best_vs_full_vocab_official"] = round(
            max(r["images_per_s"] for b, r in rows.items() if isinstance(b, int)) / full["images_per_s"], 1)
    summary["target"] = ">= 20x (batch 64 vs official)"
    print(json.dumps({"summary": summary}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="image embeddings captioned by our path")
    parser.add_argument("--baseline-images", type=int, default=None,
                        help="images through the official loop (default: all)")
    parser.add_argument("--full-vocab-images", type=int, default=16,
                        help="images through the full-vocabulary official loop (0: skip)")
    parser.add_argument("--batch1-images", type=int, default=None, help="images for our path at batch size 1")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--beam", type=int, default=1, help="also time beam search of this width (> 1)")
    parser.add_argument("--max-len", type=int, default=30)
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--config", default="decap-base", help="decoder architecture")
    parser.add_argument("--corpus", type=Path, default=WORLD_CORPUS, help="text file ingested as the bank")
    parser.add_argument("--encoder", default="world", help="encoder spec of the bank")
    parser.add_argument("--inputs", choices=["world", "random"], default="world", help="image embeddings")
    parser.add_argument("--allow-end", action="store_true", help="keep <end> reachable for the random decoder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="official loop on 8 images, full vocabulary on 2, batch 1 on 16 (< 60 s)")
    args = parser.parse_args()
    if args.quick:
        args.baseline_images = args.baseline_images or 8
        args.full_vocab_images = min(args.full_vocab_images, 2)
        args.batch1_images = args.batch1_images or 16
    run(args)


if __name__ == "__main__":
    main()
