"""What a training run shows in Prefect, and what showing it costs (issue 17), same run, same machine.

A bank of ``--lines`` world sentences (the synthetic world's corpus: short scene captions like COCO's, embedded
with the world encoder) and a short decap-small training of ``--steps`` steps, run three ways, interleaved
``--repeats`` times:

- ``library``: :func:`decapflow.lifecycle.training.train_bank` with no Prefect at all (the baseline);
- ``flow``: ``flows.train.train_flow`` on a real Prefect server on 127.0.0.1 (a progress line every 30 s and
  after each validation, the progress artifact, the training table, the loss curve, the gate's scoreboard, the
  concurrency slots);
- ``flow-every-step`` (stress case): the same with a progress line at every step.

Printed per way: the median wall seconds of the call and of the training alone, and each as a ratio to
``library``; then the last flow run's log lines and artifacts, as the UI lists them. ~4 minutes on 2 cores:

    .venv/bin/python benchmarks/flow_reporting.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--show-steps", type=int, default=400, help="Steps of the gated run shown at the end.")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="decapflow-flow-reporting-"))
    os.environ["DECAPFLOW_HOME"] = str(home)
    from tests.prefect_server import Prefect

    prefect = Prefect(home.parent / f"{home.name}-prefect", home)
    try:
        for key in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOGGING_LEVEL", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"):
            os.environ[key] = prefect.env[key]
        from decapflow.bank.ingest import run_ingest
        from decapflow.encoders import WORLD_DIR
        from decapflow.lifecycle.training import train_bank
        from flows.train import train_flow

        with gzip.open(WORLD_DIR / "corpus.txt.gz", "rt", encoding="utf-8") as f:
            lines = [next(f).strip() for _ in range(args.lines)]
        corpus = home / "world.txt"
        corpus.write_text("\n".join(lines) + "\n")
        run_ingest(corpus, "world", "world")
        recipe = {"epochs": 10, "max_steps": args.steps}
        ways = {
            "library": lambda: train_bank("world", "decap-small", recipe, progress=False),
            "flow": lambda: train_flow("world", "decap-small", recipe),
            "flow-every-step": lambda: train_flow("world", "decap-small", recipe, log_every_s=0.0),
        }
        ways["flow"]()  # warm: the first flow call imports and registers the flow
        timings: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way, call in ways.items():
                start = time.perf_counter()
                result = call()
                timings[way].append((time.perf_counter() - start, result["train_seconds"]))
        base_wall = statistics.median(w for w, _ in timings["library"])
        base_train = statistics.median(t for _, t in timings["library"])
        for way, got in timings.items():
            wall, train = statistics.median(w for w, _ in got), statistics.median(t for _, t in got)
            print(json.dumps({"way": way, "wall_s": round(wall, 2), "train_s": round(train, 2),
                              "wall_ratio": round(wall / base_wall, 3), "train_ratio": round(train / base_train, 3),
                              "extra_wall_s": round(wall - base_wall, 2)}))
        # A longer run to show, with a line every 5 s: what the UI's logs and artifacts pages hold.
        train_flow("world", "decap-small", {"epochs": 10, "max_steps": args.show_steps}, gate=True, log_every_s=5.0)
        show_last_run(prefect)
    finally:
        prefect.close()


def show_last_run(prefect) -> None:
    time.sleep(3)  # logs reach the server in batches
    runs = [r for r in prefect.post("/flow_runs/filter", {}) if r["name"] == "train-world"]
    run = max(runs, key=lambda r: r["created"])
    logs = prefect.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200})
    print(f"\n--- logs of flow run {run['name']!r}")
    for log in sorted(logs, key=lambda log: log["timestamp"]):
        print(f"{log['timestamp'][11:19]} {log['message']}")
    artifacts = prefect.post("/artifacts/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    print(f"\n--- artifacts of {run['name']!r}")
    for artifact in sorted(artifacts, key=lambda a: a["created"]):
        data = artifact["data"]
        shown = data if not isinstance(data, str) else (data[:70] + "..." if len(data) > 70 else data)
        print(f"{artifact['key']:<22} {artifact['type']:<9} {artifact['description']!r}  {shown!r}")
    (board,) = [a for a in artifacts if a["key"] == "gate-world"]
    print("\n--- gate-world (newest first)")
    for row in json.loads(board["data"]):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
