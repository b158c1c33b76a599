"""Prefix noise in training (CapDec-style) against the strategies, on the demo's world (issue 20).

The demo's setting exactly: the world-gap CLIP (real CLIP's modality gap), its corpus as the bank (or, with
``--novel``, the corpus without the test scenes' attribute combinations), decap-small trained with the demo's
recipe (6 epochs, early stopping), the 200 held-out test images, the image mean of 500 unlabelled world images.
Only ``noise_cos`` changes: the expected cosine between a noisy and a clean training prefix (none: no noise).
Each level trains a decoder (registered, not made current) and captions the test images with each strategy.

    .venv/bin/python benchmarks/noise_sweep.py --levels none,0.8,0.6            # plain split, ~15 min on 2 cores
    .venv/bin/python benchmarks/noise_sweep.py --levels none,0.8,0.6 --novel
Prints one JSON line per (level, strategy): CIDEr, BLEU-4, attribute accuracy (x100), images/s after embedding;
then CIDEr per level as a ratio to the no-noise decoder's ``pd`` (measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="none,0.8,0.6")
    parser.add_argument("--novel", action="store_true")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--strategies", default="pd,nnd,vd,ms,rerank")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, help="JSON lines go here too.")
    args = parser.parse_args()

    from corpora.world import TEST_SEED, load_scenes, write_image_set
    from decapflow.bank.ingest import run_ingest
    from decapflow.caption.captioner import Captioner, Options
    from decapflow.config import home
    from decapflow.decoder.train import TrainRecipe
    from decapflow.encoders import WORLD_DIR
    from decapflow.evaluation.experiment import run_strategies, speeds
    from decapflow.lifecycle.demo import attribute_scores, novel_corpus, record_image_mean
    from decapflow.lifecycle.training import train_from_bank

    folder = home() / "demo" / f"test-images-{args.images}"
    if not (folder / "scenes.json").is_file():
        write_image_set(folder, args.images, seed=TEST_SEED)
    scenes = load_scenes(folder)
    bank, corpus = "world-gap", WORLD_DIR / "corpus.txt.gz"
    if args.novel:
        bank, corpus = f"world-gap-novel-{args.images}", novel_corpus(folder / "corpus-novel.txt", folder)
    run_ingest(corpus, bank, "world-gap")
    rows = []
    for level in args.levels.split(","):
        noise = None if level == "none" else float(level)
        t0 = time.perf_counter()
        decoder, _ = train_from_bank(bank, config="decap-small", progress=False, promote=False,
                                     recipe=TrainRecipe(epochs=args.epochs, noise_cos=noise))
        trained = time.perf_counter() - t0
        base = Captioner.for_bank(bank, Options(), decoder=decoder)
        if base.image_mean is None:
            base.image_mean = record_image_mean(base, lambda _: None)
        experiment = run_strategies(base, folder / "captions.json", folder, args.strategies.split(","),
                                    metrics=("bleu", "cider"))
        speed = speeds(experiment)
        for name, run in experiment.runs.items():
            attrs = attribute_scores({i: c.caption for i, c in run.captions.items()}, scenes)
            row = {"split": "novel" if args.novel else "plain", "noise_cos": noise, "strategy": name,
                   "CIDEr": round(100 * run.metrics["CIDEr"], 1), "BLEU-4": round(100 * run.metrics["BLEU-4"], 1),
                   "attr-mean": round(100 * attrs["attr-mean"], 1), "images_per_s": speed[name],
                   "train_s": round(trained, 1), "decoder": decoder}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    (base_pd,) = [r["CIDEr"] for r in rows if r["noise_cos"] is None and r["strategy"] == "pd"] or [None]
    if base_pd:
        for r in rows:
            print(f"{str(r['noise_cos']):>5} {r['strategy']:<7} CIDEr {r['CIDEr']:6.1f} ({r['CIDEr'] / base_pd:.3f}x "
                  f"pd without noise)  attr {r['attr-mean']:5.1f}")


if __name__ == "__main__":
    main()
