"""Ingest and caption speed of one job alone, this tree against another (issue 19: no regression from the CPU
budgets), same run, same machine.

What users run, as subprocesses with default settings (no ``--threads``, no ``DECAPFLOW_THREADS``):

- ``decapflow ingest`` of the first ``--lines`` lines of the synthetic world corpus (short scene captions, like
  COCO's) into a new bank, world encoder, ``--prefect off``;
- ``decapflow caption --memory world`` of ``--images`` world test scenes (PNG files, like a folder of photos).

Each tree is a checkout put first on ``PYTHONPATH`` (``--before /path/to/old/checkout``; e.g.
``git worktree add --detach /tmp/before <commit>``); runs alternate between the trees ``--repeats`` times and
the medians of wall seconds are printed, with their ratio. The home (``--home``) must hold bank ``world`` with a
decoder (``benchmarks/serve_load.py --home`` makes one). Run on a quiet machine.

    .venv/bin/python benchmarks/solo_speed.py --home /tmp/serve-home --before /tmp/before
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--lines", type=int, default=8000)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from corpora.world import TEST_SEED, make_split, render
    from decapflow.encoders import WORLD_DIR

    work = Path(tempfile.mkdtemp(prefix="decapflow-solo-"))
    corpus = work / "corpus.txt"
    with gzip.open(WORLD_DIR / "corpus.txt.gz", "rt", encoding="utf-8") as lines:
        corpus.write_text("".join(line for _, line in zip(range(args.lines), lines, strict=False)), encoding="utf-8")
    images = work / "images"
    images.mkdir()
    for i, (scene, _) in enumerate(make_split(args.images, TEST_SEED)):
        render(scene).save(images / f"{i:04d}.png")
    base = {k: v for k, v in os.environ.items() if k not in ("DECAPFLOW_THREADS", "OMP_NUM_THREADS")}
    base |= {"DECAPFLOW_HOME": str(args.home), "HF_HUB_OFFLINE": "1"}
    trees = {"after": ROOT, "before": args.before.resolve()}
    seconds: dict[tuple[str, str], list[float]] = {}
    for r in range(args.repeats):
        for name, tree in trees.items():
            env = base | {"PYTHONPATH": str(tree)}
            cli = [sys.executable, "-m", "decapflow.cli"]
            ingest = cli + ["ingest", str(corpus), "--memory", f"solo-{name}-{r}", "--encoder", "world",
                            "--prefect", "off"]
            seconds.setdefault((name, "ingest"), []).append(timed(ingest, env))
            caption = cli + ["caption", "--memory", "world", str(images), "--output", str(work / f"{name}.txt")]
            seconds.setdefault((name, "caption"), []).append(timed(caption, env))
            print(json.dumps({"repeat": r, "tree": name, "ingest_s": round(seconds[name, "ingest"][-1], 2),
                              "caption_s": round(seconds[name, "caption"][-1], 2)}), flush=True)
    for job in ("ingest", "caption"):
        after, before = (statistics.median(seconds[t, job]) for t in ("after", "before"))
        print(json.dumps({"job": job, "median_s_before": round(before, 2), "median_s_after": round(after, 2),
                          "speed_after_over_before": round(before / after, 3)}), flush=True)


if __name__ == "__main__":
    main()
