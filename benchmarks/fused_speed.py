"""Training throughput of a retrieval-fused decoder against a plain one (issue 30's goal: >= 0.67x plain tokens/s).

The demo's bank (the world corpus embedded by the ``world-gap`` CLIP, 21,106 rows), decap-small, the demo's batch
size; plain and fused (``FUSED_CONFIG`` + ``FUSED_RECIPE``: k neighbours per caption, retrieved for every row once
per epoch, with noise and self-exclusion, and read as k more prefix tokens) trained in turn, ``--rounds`` times each,
interleaved (plain, fused, plain, fused...) so a busy machine slows both alike. Tokens/s is what training reports
over its steps (caption tokens; the fused decoder's extra prefix positions are its cost), the fused epoch's
neighbour retrieval included. Prints each run and the median ratio.

    .venv/bin/python benchmarks/fused_speed.py --steps 300 --rounds 2 --home /tmp/fused-speed
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per training (one epoch is 306)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--home", type=Path, required=True)
    args = parser.parse_args()
    os.environ["DECAPFLOW_HOME"] = str(args.home)
    from decapflow.bank.ingest import run_ingest
    from decapflow.decoder.recipe import FUSED_RECIPE
    from decapflow.decoder.train import TrainRecipe
    from decapflow.encoders import WORLD_DIR
    from decapflow.lifecycle.training import train_from_bank

    print(run_ingest(WORLD_DIR / "corpus.txt.gz", "world-gap", "world-gap").summary(), flush=True)
    rates: dict[str, list[float]] = {"plain": [], "fused": []}
    walls: dict[str, list[float]] = {"plain": [], "fused": []}
    for _ in range(args.rounds):
        for kind in rates:
            extra = FUSED_RECIPE if kind == "fused" else {}
            recipe = TrainRecipe.from_dict({**extra, "epochs": 1000, "max_steps": args.steps})
            start = time.perf_counter()
            decoder_id, result = train_from_bank("world-gap", config="decap-small", recipe=recipe, progress=False,
                                                 promote=False, fused=kind == "fused" or None)
            history = result.history
            rate = sum(h["tokens_per_s"] * h["seconds"] for h in history) / sum(h["seconds"] for h in history)
            rates[kind].append(rate)
            walls[kind].append(time.perf_counter() - start)
            print(f"{kind:<6} {decoder_id}: {args.steps} steps in {time.perf_counter() - start:.0f} s, "
                  f"{rate:,.0f} tokens/s", flush=True)
    plain, fused = statistics.median(rates["plain"]), statistics.median(rates["fused"])
    print(f"\nmedian tokens/s: plain {plain:,.0f}, fused {fused:,.0f}: fused = {fused / plain:.2f}x plain")
    wall_plain, wall_fused = statistics.median(walls["plain"]), statistics.median(walls["fused"])
    print(f"median wall s (start-up, retrieval, validation, checkpoints included): plain {wall_plain:.0f}, fused "
          f"{wall_fused:.0f}: fused = {wall_plain / wall_fused:.2f}x plain's speed")


if __name__ == "__main__":
    main()
