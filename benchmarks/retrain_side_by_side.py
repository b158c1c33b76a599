"""Two banks' triggered retrains (issue 17): serialised by a deployment-wide limit (before) against side by side
under per-bank slots (now), same run, same machine.

What users run: banks ``north`` and ``south`` of ``--lines`` world sentences each (the synthetic world's corpus:
short scene captions like COCO's, embedded with the world encoder; the banks are disjoint line ranges), the
deployments of ``prefect.yaml`` on a real Prefect server on 127.0.0.1 with one process worker, and
``retrain-on-ingest`` sized to ``--steps`` steps of decap-small. Each round ingests ``--new`` new sentences into
both banks with ``decapflow ingest`` (the server configured, so each ingest emits ``decapflow.bank.updated``) and
times, from the start of the two ingests (run at once), until both triggered retrains completed.

- ``serialised``: the deployment's ``concurrency_limit`` set to 1, as ``prefect.yaml`` had it before;
- ``side-by-side``: no deployment limit (``prefect.yaml`` now); each training holds ``train-BANK`` and
  ``trainings-HOST`` (:mod:`flows.slots`).

Rounds alternate (``--rounds`` of each). Printed: the wall time of each round, the training windows of its two
runs, and the ratio side-by-side / serialised. ~6 minutes on 2 cores:

    .venv/bin/python benchmarks/retrain_side_by_side.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
BANKS = ("north", "south")

SET_LIMIT = """
import asyncio, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate

async def main(name, limit):
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        await client.update_deployment(deployment.id, DeploymentUpdate(concurrency_limit=int(limit) if limit != "none"
                                                                       else None))
        limit = (await client.read_deployment(deployment.id)).global_concurrency_limit
        print(limit.limit if limit else None)

asyncio.run(main(*sys.argv[1:]))
"""


def world_lines() -> list[str]:
    from decapflow.encoders import WORLD_DIR

    with gzip.open(WORLD_DIR / "corpus.txt.gz", "rt", encoding="utf-8") as f:
        return list(dict.fromkeys(line.strip() for line in f if line.strip()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=6000, help="Sentences per bank before the rounds.")
    parser.add_argument("--new", type=int, default=200, help="New sentences per bank and round.")
    parser.add_argument("--steps", type=int, default=200, help="Training steps of each triggered retrain.")
    parser.add_argument("--rounds", type=int, default=1, help="Rounds of each mode (alternating).")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="decapflow-side-by-side-"))
    os.environ["DECAPFLOW_HOME"] = str(home)
    from decapflow.bank.ingest import run_ingest
    from tests.prefect_server import SET_PARAMETERS, Prefect

    lines = world_lines()
    need = len(BANKS) * (args.lines + 2 * args.rounds * args.new)
    assert len(lines) >= need, f"the world corpus has {len(lines)} distinct lines; {need} needed"
    pools = {bank: lines[i * need // len(BANKS):(i + 1) * need // len(BANKS)] for i, bank in enumerate(BANKS)}
    for bank in BANKS:
        first = home / f"{bank}.txt"
        first.write_text("\n".join(pools[bank][: args.lines]) + "\n")
        run_ingest(first, bank, "world")  # no server: no event
    prefect = Prefect(home.parent / f"{home.name}-prefect", home)
    rounds: list[dict[str, object]] = []
    try:
        for pool in ("cpu", "gpu"):
            prefect.run("work-pool", "create", pool, "--type", "process")
        prefect.run("--no-prompt", "deploy", "--all")
        sized = {"config": "decap-small", "recipe": {"epochs": 1, "max_steps": args.steps}, "min_new_rows": 1}
        prefect.python(SET_PARAMETERS, "decapflow-retrain-bank/retrain-on-ingest", json.dumps(sized))
        prefect.worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cpu"],
                                          env=prefect.env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
        offset = args.lines
        modes = ["serialised", "side-by-side"] * args.rounds
        for number, mode in enumerate(modes):
            limit = prefect.python(SET_LIMIT, "decapflow-retrain-bank/retrain-on-ingest",
                                   "1" if mode == "serialised" else "none").strip()
            before = len(prefect.flow_runs("retrain-on-ingest"))
            procs = []
            ended = datetime.now(timezone.utc)  # both ingests start together; times count from here
            for bank in BANKS:
                extra = home / f"{bank}-{number}.txt"
                extra.write_text("\n".join(pools[bank][offset: offset + args.new]) + "\n")
                procs.append(subprocess.Popen([str(BIN / "decapflow"), "ingest", str(extra), "--memory", bank,
                                               "--prefect", "off"], env=prefect.env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, text=True))
            for proc in procs:
                _, err = proc.communicate(timeout=300)
                assert proc.returncode == 0, err
            offset += args.new
            runs = prefect.wait_for_runs("retrain-on-ingest", before + 2, timeout=1800)
            mine = sorted((r for r in runs if datetime.fromisoformat(r["start_time"]) >= ended),
                          key=lambda r: r["start_time"])
            assert len(mine) == 2, [r["name"] for r in runs]
            trainings = [t for t in prefect.task_runs(*(f"train-{b}" for b in BANKS))
                         if datetime.fromisoformat(t["start_time"]) >= ended]
            last = max(datetime.fromisoformat(r["end_time"]) for r in mine)
            row = {"mode": mode, "deployment_limit": limit, "wall_s": round((last - ended).total_seconds(), 1),
                   "runs": [r["name"] for r in mine],
                   "trainings_s_after_start": [
                       [round((datetime.fromisoformat(t[k]) - ended).total_seconds(), 1) for k in ("start_time",
                                                                                             "end_time")]
                       for t in sorted(trainings, key=lambda t: t["start_time"])]}
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        prefect.close()
    walls = {mode: [r["wall_s"] for r in rounds if r["mode"] == mode] for mode in ("serialised", "side-by-side")}
    mean = {mode: sum(v) / len(v) for mode, v in walls.items()}
    print(json.dumps({"serialised_s": walls["serialised"], "side_by_side_s": walls["side-by-side"],
                      "ratio_side_by_side_over_serialised": round(mean["side-by-side"] / mean["serialised"], 2)}))


if __name__ == "__main__":
    main()
