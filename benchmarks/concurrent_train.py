"""Concurrent trainings on one machine (issue 19): 1, 2 and 3 ``decapflow train`` processes of different banks
started together, under each thread setting, against one job alone with today's setting, same run, same machine.

What users run: ``decapflow train --memory BANK --max-steps 300 --prefect off`` (decap-small, default batch), one
process per bank, as a Prefect process worker or a second terminal would start them. Each bank is the first
``--lines`` lines of the synthetic world's corpus (short captions of scenes, like COCO's) embedded with the world
encoder; the banks differ by their line offset.

Settings (each a set of environment variables for every job):

- ``two-active``: 2 threads each with OpenMP's default (active) wait: what every job did before decapflow.cpu
  (torch sized its pool from the machine's cores);
- ``one``: ``DECAPFLOW_THREADS=1`` for every job;
- ``two-passive``: 2 threads each, ``OMP_WAIT_POLICY=PASSIVE``;
- ``auto``: the default now, a fair share re-read every 0.5 s (alone: every CPU; two on 2 CPUs: one each).

Tokens/s of a job are its training tokens over its training seconds (``metrics.jsonl``: validation and
checkpoints excluded, as in the issue's figures); a configuration's total is the sum over its jobs, and every
figure is printed as a ratio to ``two-active`` alone. Run it on a quiet machine (~12 minutes on 2 cores):

    .venv/bin/python benchmarks/concurrent_train.py
    .venv/bin/python benchmarks/concurrent_train.py --settings auto --jobs 1 2 --steps 100   # a quick look
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "two-active": {"DECAPFLOW_THREADS": "2"},
    "one": {"DECAPFLOW_THREADS": "1"},
    "two-passive": {"DECAPFLOW_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "auto": {},
}


def make_banks(home: Path, count: int, lines: int) -> list[str]:
    """Banks world-0 .. world-{count-1} (reused when present): ``lines`` lines of the world corpus each."""
    with gzip.open(ROOT / "corpora" / "world" / "corpus.txt.gz", "rt") as f:
        corpus = f.read().splitlines()
    names = []
    for i in range(count):
        name = f"world-{i}"
        names.append(name)
        done = home / f"{name}.ingested"
        if done.exists():  # by an earlier run
            continue
        home.mkdir(parents=True, exist_ok=True)
        corpus_file = home / f"{name}.corpus.txt"
        corpus_file.write_text("\n".join(corpus[i * lines : (i + 1) * lines]) + "\n")
        subprocess.run([sys.executable, "-m", "decapflow.cli", "ingest", str(corpus_file), "--memory", name,
                        "--encoder", "world", "--prefect", "off"], check=True, env=environment(home, {}),
                       stdout=subprocess.DEVNULL)
        done.touch()
    return names


def environment(home: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DECAPFLOW_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "PREFECT_API_URL")}
    env.update({"DECAPFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1", "DECAPFLOW_DEVICE": "cpu",
                "PYTHONPATH": str(ROOT), **extra})
    return env


def run_jobs(home: Path, banks: list[str], setting: dict[str, str], steps: int, config: str) -> dict:
    """Start one training per bank at once; tokens/s of each and the pair's wall time."""
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "decapflow.cli", "train", "--memory", bank, "--config", config,
                               "--max-steps", str(steps), "--epochs", "1000", "--prefect", "off", "--json"],
                              env=environment(home, setting), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
             for bank in banks]
    rates = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode:
            raise RuntimeError(f"decapflow train failed ({proc.returncode})")
        history = json.loads(out)["history"]
        tokens = sum(h["tokens_per_s"] * h["seconds"] for h in history)
        rates.append(tokens / sum(h["seconds"] for h in history))
    return {"tokens_per_s": rates, "total": sum(rates), "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--jobs", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lines", type=int, default=4000, help="corpus lines per bank")
    parser.add_argument("--config", default="decap-small")
    parser.add_argument("--home", type=Path, help="DECAPFLOW_HOME to keep the banks in (default: a temporary one)")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="decapflow-concurrent-"))
    banks = make_banks(home, max(args.jobs), args.lines)
    print(f"{os.cpu_count()} CPUs, usable {len(os.sched_getaffinity(0))}; {args.steps} steps of {args.config} "
          f"per job; banks in {home}")
    baseline = run_jobs(home, banks[:1], SETTINGS["two-active"], args.steps, args.config)["total"]
    print(f"baseline: two-active, one job alone: {baseline:,.0f} tokens/s\n")
    print(f"{'setting':<12} {'jobs':>4} {'each (tokens/s)':<28} {'total':>8} {'x base':>7} {'wall s':>7}")
    for name in args.settings:
        for jobs in args.jobs:
            r = run_jobs(home, banks[:jobs], SETTINGS[name], args.steps, args.config)
            each = " ".join(f"{t:,.0f}" for t in r["tokens_per_s"])
            print(f"{name:<12} {jobs:>4} {each:<28} {r['total']:>8,.0f} {r['total'] / baseline:>7.2f} "
                  f"{r['wall_s']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
