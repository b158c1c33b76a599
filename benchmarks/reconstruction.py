"""How well does a text-only trained decoder rebuild held-out sentences from their own CLIP embeddings?

Data: synthetic COCO-like sentences (a seeded template grammar, ~300 words), embedded with a tiny open_clip
text tower with deterministic random weights (offline; a real CLIP's embeddings are easier to decode). The
decoder is trained with ``train_decoder`` and decodes the held-out sentences (greedy and beam 3); we report exact
match and BLEU-4 (pycocoevalcap's scorer). Then the vocabulary compaction: greedy decode speed and checkpoint
size of the same architecture with the full CLIP vocabulary (49,408 ids) versus the compact one.

    .venv/bin/python benchmarks/reconstruction.py --n 4000 --config decap-small --epochs 3
    .venv/bin/python benchmarks/reconstruction.py --compaction-only
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from decapflow.decoder import TrainRecipe, Vocab, build_decoder, load_decoder, save_decoder, train_decoder
from decapflow.decoder.vocab import texts_key, tokenize

TINY_TEXT_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
NOUNS = ["man", "woman", "dog", "cat", "child", "boy", "girl", "horse", "bird", "cow", "sheep", "elephant",
         "giraffe", "zebra", "bus", "train", "car", "truck", "plane", "boat", "bicycle", "motorcycle", "pizza",
         "cake", "sandwich", "person", "player", "skier", "surfer", "teddy bear", "clock", "laptop", "vase"]
ADJS = ["red", "blue", "green", "yellow", "white", "black", "brown", "small", "large", "old", "young",
        "wooden", "little", "big", "tall", "colorful", "striped", "dirty", "empty", "shiny"]
ACTIONS = ["sitting on", "standing next to", "walking down", "lying on", "parked near", "flying over",
           "looking at", "running across", "resting on", "waiting at", "leaning against", "riding along"]
PLACES = ["the beach", "a busy street", "a grassy field", "a kitchen table", "the snow", "a tennis court",
          "the water", "a wooden bench", "a city sidewalk", "a dirt road", "the grass", "a train station",
          "a living room", "a parking lot", "the ocean", "a snowy hill", "a crowded market", "a brick wall"]
EXTRAS = ["", "", "", " in the rain", " at night", " on a sunny day", " with a frisbee", " near a fence",
          " next to a tree", " in front of a building"]
TEMPLATES = [
    "{det} {adj} {noun} {action} {place}{extra}.",
    "{det} {noun} {action} {place}{extra}.",
    "there is {det_a} {adj} {noun} {action} {place}.",
    "a close up of {det_a} {adj} {noun} on {place}.",
    "{det} {adj} {noun} and {det_b} {noun2} {action_pl} {place}.",
    "a photo of {det_a} {noun} {action} {place}{extra}.",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct synthetic captions (seeded)."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        text = rng.choice(TEMPLATES).format(
            det=rng.choice(["a", "the"]), det_a="a", det_b=rng.choice(["a", "the"]), adj=rng.choice(ADJS),
            noun=rng.choice(NOUNS), noun2=rng.choice(NOUNS), action=rng.choice(ACTIONS),
            action_pl="are " + rng.choice(ACTIONS), place=rng.choice(PLACES), extra=rng.choice(EXTRAS),
        )
        text = re.sub(r"\ba ([aeiou])", r"an \1", text)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def embed(texts: list[str], workdir: Path) -> np.ndarray:
    """Unit embeddings from a tiny random open_clip text tower (cached in ``workdir``)."""
    cache = workdir / f"emb-{texts_key(texts, None)}.npy"
    if cache.exists():
        return np.load(cache)
    from decapflow.encoders import load_encoder

    config = workdir / "bench-text-clip.json"
    config.write_text(json.dumps(TINY_TEXT_CLIP))
    vectors = load_encoder(f"{config}:random", device="cpu").encode_text(texts)
    np.save(cache, vectors)
    return vectors


def bleu4(predictions: list[str], references: list[str]) -> float:
    from pycocoevalcap.bleu.bleu import Bleu

    res = {i: [p] for i, p in enumerate(predictions)}
    gts = {i: [r] for i, r in enumerate(references)}
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(score[3])


def reconstruction(args: argparse.Namespace, workdir: Path) -> None:
    texts = sentences(args.n + args.heldout, seed=0)
    vectors = embed(texts, workdir)
    train_texts, test_texts = texts[: args.n], texts[args.n :]
    recipe = replace(TrainRecipe(), epochs=args.epochs, lr=args.lr, device="cpu", num_threads=args.threads,
                     batch_size=args.batch_size, warmup_steps=args.warmup, amp=args.amp)
    start = time.perf_counter()
    result = train_decoder(train_texts, vectors[: args.n], config=args.config, recipe=recipe,
                           out_dir=workdir / "run", progress=args.progress, token_cache=False)
    seconds = time.perf_counter() - start
    model, vocab, _ = load_decoder(result.best)
    refs = [vocab.decode(vocab.to_compact(vocab_ids)) for vocab_ids in _clip_rows(test_texts, vocab)]
    print(f"trained {args.config} on {args.n} sentences: {result.steps} steps in {seconds:.0f} s, "
          f"best epoch {result.best_epoch}, val loss {result.best_val_loss:.3f}, "
          f"{result.history[-1]['tokens_per_s']:.0f} tokens/s")
    for beam in (1, 3):
        start = time.perf_counter()
        preds = model.decode_texts(vectors[args.n :], vocab, beam=beam)
        took = time.perf_counter() - start
        exact = np.mean([p == r for p, r in zip(preds, refs, strict=True)])
        print(f"  held-out {len(refs)}: beam {beam}: exact match {exact:.3f}, BLEU-4 {bleu4(preds, refs):.3f}, "
              f"{len(refs) / took:.0f} sentences/s")
    for p, r in list(zip(preds, refs, strict=True))[:3]:
        print(f"    ref: {r}\n    out: {p}")


def _clip_rows(texts: list[str], vocab: Vocab) -> list[list[int]]:
    """CLIP ids of held-out texts, without words the training texts never used (so references decode)."""
    known = set(vocab.clip_ids)
    return [[t for t in row if t in known] for row in tokenize(texts)]


def compaction(args: argparse.Namespace, workdir: Path) -> None:
    """Greedy decode speed and checkpoint size: full CLIP vocabulary vs the compact one of this corpus."""
    texts = sentences(args.n, seed=0)
    compact = Vocab.build(np.concatenate(tokenize(texts)))
    full = Vocab.identity()
    prefix = torch.nn.functional.normalize(torch.randn(args.batch, 512), dim=-1)
    print(f"compact vocabulary of {len(texts)} sentences: {len(compact)} ids; a COCO-sized one: 10,002 ids; "
          f"full: {len(full)}")
    coco_sized = Vocab.build(np.random.default_rng(0).choice(49406, 10_000, replace=False))
    for name in ("decap-small", "decap-base"):
        row = {}
        for label, vocab in (("full", full), ("compact", compact), ("10k", coco_sized)):
            torch.manual_seed(0)
            model = build_decoder(name, vocab, prefix_dim=512).eval()
            folder = save_decoder(workdir / f"{name}-{label}", model, vocab, {})
            size = (folder / "model.safetensors").stat().st_size / 2**20
            model.generate(prefix[:2], max_len=4)  # warm-up
            start = time.perf_counter()
            model.generate(prefix, max_len=args.max_len)  # random weights: runs all max_len steps
            row[label] = (size, time.perf_counter() - start)
        (fs, ft) = row["full"]
        for label in ("compact", "10k"):
            cs, ct = row[label]
            print(f"{name}: checkpoint {fs:.1f} MiB full vs {cs:.1f} MiB {label} ({fs / cs:.1f}×); greedy "
                  f"{args.batch}×{args.max_len} tokens {ft:.2f} s full vs {ct:.2f} s {label} ({ft / ct:.1f}× faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000, help="training sentences")
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--config", default="decap-small")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=TrainRecipe().lr)
    parser.add_argument("--batch-size", type=int, default=TrainRecipe().batch_size)
    parser.add_argument("--warmup", type=int, default=TrainRecipe().warmup_steps)
    parser.add_argument("--amp", default="auto", help="auto (bf16 on CUDA only), bf16 or off")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="decode batch for the compaction timing")
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--compaction-only", action="store_true")
    parser.add_argument("--skip-compaction", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="decap-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if not args.compaction_only:
            reconstruction(args, workdir)
        if not args.skip_compaction:
            compaction(args, workdir)


if __name__ == "__main__":
    main()
