"""Removing 1% of a big bank by file against the time its ingest took, measured in the same run (issue 29's goal:
less than a tenth), with restore and purge timed beside it.

The bank is ``--rows`` distinct world sentences (:mod:`corpora.world_text`, what a big text corpus looks like to the
bank: distinct sentences of 8-25 words) ingested with ``decapflow ingest --encoder world`` in a subprocess, and a
tiny decoder trained on it (so the removal also counts each decoder's stale rows, as it does in real use). The file
removed is ``--share`` of the ingested lines, drawn at random and written the way a user would hand it back: one per
line, some with stray whitespace (ingest's cleaning must match them). Each step runs as the CLI in a subprocess:

    ingest -> memory remove --file (timed) -> memory restore --version (timed) -> memory remove --file --purge (timed)

    .venv/bin/python benchmarks/bank_removal.py --rows 20000                  # smoke run, ~1 minute
    .venv/bin/python benchmarks/bank_removal.py --rows 1000000 --home /tmp/removal   # ~5 minutes

Output: a table of seconds and ratios to the ingest, and a final JSON line; never assertions.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from big_bank import run_child  # noqa: E402  (a subprocess's result, wall time and peak RSS)

BANK = "removal"
CLI = """
import sys, json; sys.path.insert(0, {root!r})
from decapflow.cli.base import main
try:
    main({args!r}, standalone_mode=False)
except SystemExit as exc:
    if exc.code: raise
result = {{}}
"""


def cli(*args: str, env: dict[str, str]) -> dict:
    return run_child(CLI.format(root=str(ROOT), args=list(args)), env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--share", type=float, default=0.01, help="Share of the ingested lines removed.")
    parser.add_argument("--home", type=Path, help="Keep the bank here (default: a temporary folder).")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="decapflow-removal-"))
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DECAPFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    corpus = home / f"world-{args.rows}.txt.gz"
    if not corpus.exists():
        from corpora.world_text import write_big_corpus

        write_big_corpus(corpus, args.rows)
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    rng = random.Random(0)
    picked = rng.sample(lines, int(len(lines) * args.share))
    removal = home / "to-remove.txt"
    removal.write_text("".join(("  " + s.replace(" ", "  ", 1) + "\t" if i % 3 == 0 else s) + "\n"
                               for i, s in enumerate(picked)), encoding="utf-8")
    steps: dict[str, dict] = {}
    steps["ingest"] = cli("ingest", str(corpus), "--memory", BANK, "--encoder", "world", "--prefect", "off",
                          env=env)
    cli("train", "--memory", BANK, "--config", "tiny", "--max-steps", "5", "--prefect", "off", env=env)
    version = int(run_child(f"import sys; sys.path.insert(0, {str(ROOT)!r})\nfrom decapflow.bank.memory import "
                            f"Registry\nresult = {{'version': Registry().open({BANK!r}).version}}\n", env)["version"])
    steps["remove --file"] = cli("memory", "remove", BANK, "--file", str(removal), env=env)
    steps["restore --version"] = cli("memory", "restore", BANK, "--version", str(version), env=env)
    steps["remove --file --purge"] = cli("memory", "remove", BANK, "--file", str(removal), "--purge", "--yes",
                                         env=env)
    base = steps["ingest"]["wall_s"]
    print(f"\nbank of {len(lines):,} distinct world sentences; {len(picked):,} removed by file ({args.share:.0%})\n")
    print("| step | wall s | x ingest | peak RSS GB |\n|---|---:|---:|---:|")
    for name, step in steps.items():
        print(f"| {name} | {step['wall_s']:.1f} | {step['wall_s'] / base:.3f} | {step['peak_rss_gb']:.2f} |")
    print(json.dumps({"rows": len(lines), "removed": len(picked),
                      **{k: round(v["wall_s"], 2) for k, v in steps.items()}}))


if __name__ == "__main__":
    main()
