"""Which candidates ``rerank`` needs (issue 20): CIDEr and speed of re-ranking each candidate set, against ``pd``.

On the demo's world (the 200 held-out test images, embedded once) with a bank and decoder trained as
``benchmarks/noise_sweep.py`` leaves them (``--home`` of that run; ``--decoder`` an id, default the newest): for
each candidate set, ``rerank`` decodes the set's prefixes of every image in one batch, embeds the distinct
captions with CLIP's text encoder and keeps the closest. Printed per set: CIDEr, attribute accuracy, images/s
after embedding and its ratio to ``pd``'s in the same run (the goal: >= 0.5x).

    DECAPFLOW_HOME=/tmp/sw/home-plain .venv/bin/python benchmarks/rerank_candidates.py --bank world-gap
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

SETS = {
    "pd (alone)": None,
    "ms (alone)": None,
    "now: pd nnd ms pd+ms.25 .5 .75": ("pd", "nnd", "ms", "pd+ms0.25", "pd+ms0.5", "pd+ms0.75"),
    "pd ms": ("pd", "ms"),
    "pd pd+ms.5": ("pd", "pd+ms0.5"),
    "pd ms pd+ms.5": ("pd", "ms", "pd+ms0.5"),
    "pd nnd ms": ("pd", "nnd", "ms"),
    "pd vd": ("pd", "vd"),
    "pd ms vd": ("pd", "ms", "vd"),
    "pd pd@0.02 ms": ("pd", "pd@0.02", "ms"),
    "pd ms clipre": ("pd", "ms", "clipre"),
    "pd nnd ms clipre": ("pd", "nnd", "ms", "clipre"),
    "pd ms pd+ms.5 clipre": ("pd", "ms", "pd+ms0.5", "clipre"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", default="world-gap")
    parser.add_argument("--decoder")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per set (the fastest counts).")
    parser.add_argument("--sets", help="Only these sets (comma-separated names).")
    args = parser.parse_args()
    from dataclasses import replace

    from corpora.world import load_scenes
    from decapflow.caption.captioner import Captioner, Options
    from decapflow.config import home
    from decapflow.decoder.registry import decoders
    from decapflow.evaluation.evaluate import score_captions
    from decapflow.evaluation.experiment import embed_annotated_images
    from decapflow.lifecycle.demo import attribute_scores

    folder = home() / "demo" / f"test-images-{args.images}"
    decoder = args.decoder or decoders().list(args.bank)[-1]["id"]
    base = Captioner.for_bank(args.bank, Options(), decoder=decoder)
    assert base.image_mean is not None, "record the image mean first (benchmarks/noise_sweep.py does)"
    references, ids, vectors, _ = embed_annotated_images(base, folder / "captions.json", folder)
    scenes = load_scenes(folder)
    pd_speed = None
    chosen = args.sets.split(",") if args.sets else list(SETS)
    for name, candidates in ((n, SETS[n]) for n in chosen):
        strategy = name.split()[0] if candidates is None else "rerank"
        captioner = base.with_options(replace(base.options, strategy=strategy))
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            captions = (captioner.caption_embeddings(vectors) if candidates is None else
                        captioner._rerank(vectors, candidates))
            best = min(best, time.perf_counter() - start)
        speed = len(ids) / best
        pd_speed = pd_speed or speed
        by_id = {i: c.caption for i, c in zip(ids, captions, strict=True)}
        cider = score_captions(references, by_id, metrics=("cider",))["CIDEr"]
        attrs = attribute_scores(by_id, scenes)["attr-mean"]
        print(json.dumps({"set": name, "decoder": decoder, "CIDEr": round(100 * cider, 1),
                          "attr-mean": round(100 * attrs, 1), "images_per_s": round(speed, 1),
                          "speed_vs_pd": round(speed / pd_speed, 2)}), flush=True)


if __name__ == "__main__":
    main()
