"""``decapflow serve`` while a training runs on the same machine (issue 19): p50/p99 at concurrency 8, against the
same server idle, same run, same machine.

What a team runs: one ``decapflow serve --preload world`` (micro-batching, its compute worker in a process) and a
``decapflow train --memory world --prefect off`` started beside it, as a Prefect process worker's retrain would.
The requests are world scene PNGs (the synthetic world's test split, like the photos users send: one image per
request, multipart), sent with asyncio + httpx to 127.0.0.1 only, ``--requests`` per point (bounded).

Settings (environment of both the server and the training):

- ``all-cores``: ``DECAPFLOW_THREADS`` = every CPU for both, what each process did before decapflow.cpu;
- ``auto``: the default now, a fair share (the server counts as a job only while it answers).

For each setting: the idle server (warm-up, then ``--requests`` at concurrency 8), then a training started
beside it (given 20 s to import and load the bank), the same load again, the training stopped. Printed:
p50/p99, errors and the ratios of p50 and p99 under training to idle.

    .venv/bin/python benchmarks/serve_beside_train.py --home /tmp/serve-home      # ~6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import ensure_world, load, start_server, world_images  # noqa: E402

SETTINGS = {"all-cores": {"DECAPFLOW_THREADS": str(len(os.sched_getaffinity(0)))}, "auto": {}}


def start_training(env: dict[str, str], log: Path, settle_s: float = 20.0) -> subprocess.Popen:
    """A long ``decapflow train`` of the world bank, given ``settle_s`` to import, load the bank and start."""
    cmd = [sys.executable, "-m", "decapflow.cli", "train", "--memory", "world", "--max-steps", "100000",
           "--prefect", "off"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    time.sleep(settle_s)
    if proc.poll() is not None:
        raise RuntimeError(f"the training stopped: {log.read_text()[-2000:]}")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="DECAPFLOW_HOME to use (default: a temporary one)")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="decapflow-serve-train-"))
    os.environ["DECAPFLOW_HOME"] = str(home)
    ensure_world(600)
    images = world_images(200)
    for name in args.settings:
        env = {k: v for k, v in os.environ.items() if k != "DECAPFLOW_THREADS"} | SETTINGS[name]
        os.environ.clear()
        os.environ.update(env)  # the server started below inherits it
        proc, url = start_server(32, home / f"serve-{name}.log", threads=None)
        try:
            asyncio.run(load(url, images, 50, 8))  # warm-up
            idle = asyncio.run(load(url, images, args.requests, 8))
            print(json.dumps({"setting": name, "training": False, **idle}), flush=True)
            train = start_training(env, home / f"train-{name}.log")
            try:
                busy = asyncio.run(load(url, images, args.requests, 8))
            finally:
                train.kill()
                train.wait(30)
            print(json.dumps({"setting": name, "training": True, **busy}), flush=True)
            print(json.dumps({"setting": name, "summary": True, "p99_ratio": round(busy["p99_ms"] / idle["p99_ms"], 2),
                              "p50_ratio": round(busy["p50_ms"] / idle["p50_ms"], 2),
                              "errors": idle["errors"] + busy["errors"]}), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
