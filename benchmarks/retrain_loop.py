"""The retraining loop on the world bank (issue 9), timed: ingest -> event -> triggered retrain -> gate -> serving.

1. The write path: one 4,096-row chunk into banks of 20k and 200k rows, a plain append (the old way) against
   the bank's lock plus an insert-only merge on hash (the new way). Then concurrent ingest: the world corpus (21,106 distinct sentences) into a fresh bank once (the baseline), then
   into another fresh bank by two processes at once (the same file, full overlap). Rows must equal the distinct
   count; the ratio of wall times says what the bank's write lock costs.
2. The loop: bank ``world`` with a ``decap-small`` decoder trained ``--champion-steps`` steps by hand (current), a
   real Prefect server, ``prefect deploy --all`` from prefect.yaml (``retrain-on-ingest`` sized to
   ``--steps`` training steps), a process worker, and ``decapflow serve`` with a client captioning one image every
   0.1 s. Then ingest ``--new`` new world sentences with the server configured and time, from the end of the
   ingest: the triggered flow run starting, the challenger registered (training), the decision (the gate), and
   the first answer from the running server with the new decoder.

    .venv/bin/python benchmarks/retrain_loop.py                 # ~10 minutes on 2 cores
Everything runs on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def ingest(path: Path, bank: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "decapflow"), "ingest", str(path), "--memory", bank, "--encoder", "world",
                             "--prefect", "off", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def concurrent_ingest(env: dict[str, str]) -> dict[str, float]:
    from decapflow.bank.memory import Registry
    from decapflow.encoders import WORLD_DIR

    corpus = WORLD_DIR / "corpus.txt.gz"
    start = time.perf_counter()
    assert ingest(corpus, "single", env).wait() == 0
    single = time.perf_counter() - start
    start = time.perf_counter()
    procs = [ingest(corpus, "pair", env) for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0], [p.stderr.read()[-1000:] for p in procs]
    pair = time.perf_counter() - start
    written = [json.loads(p.stdout.read())["written"] for p in procs]
    rows = len(Registry().open("pair"))
    return {"single_s": round(single, 1), "two_concurrent_s": round(pair, 1), "ratio": round(pair / single, 2),
            "rows": rows, "distinct": len(Registry().open("single")), "written_by_each": written}


def write_path(existing: int, chunk: int = 4096, repeats: int = 3) -> dict[str, float]:
    """One chunk written into a bank of ``existing`` rows: a plain LanceDB append (what ingest did before: not
    safe with concurrent writers) against ``MemoryBank.add`` (the bank's lock, then an insert-only merge on hash)."""
    import numpy as np

    from decapflow.bank.memory import Registry

    rng = np.random.default_rng(0)
    registry = Registry(tempfile.mkdtemp(prefix="decapflow-write-"))
    bank = registry.create("w", "bench", 512)
    when = datetime.now().astimezone()

    def rows(n: int, start: int) -> tuple[list[str], list[str], np.ndarray]:
        hashes = [f"{i:064x}" for i in range(start, start + n)]
        return hashes, hashes, rng.standard_normal((n, 512), dtype=np.float32)

    for start in range(0, existing, 50_000):
        bank.add(*rows(min(50_000, existing - start), start), source="seed", added_at=when)
    plain, locked = [], []
    for r in range(repeats):
        h, t, v = rows(chunk, 10_000_000 + 2 * r * chunk)
        unlocked = type(bank)(bank.name, bank.table, None)  # no store: a plain append
        start = time.perf_counter()
        unlocked.add(h, t, v, source="x", added_at=when)
        plain.append(time.perf_counter() - start)
        h, t, v = rows(chunk, 10_000_000 + (2 * r + 1) * chunk)
        start = time.perf_counter()
        bank.add(h, t, v, source="x", added_at=when)
        locked.append(time.perf_counter() - start)
    a, b = min(plain), min(locked)
    return {"bank_rows": existing, "chunk": chunk, "append_ms": round(1000 * a, 1), "locked_merge_ms": round(1000 * b, 1),
            "ratio": round(b / a, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="Training steps of the triggered challenger.")
    parser.add_argument("--champion-steps", type=int, default=30, help="Steps of the current decoder (weak).")
    parser.add_argument("--new", type=int, default=2000, help="New sentences ingested to trigger the retrain.")
    parser.add_argument("--skip-concurrent", action="store_true")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="decapflow-retrain-bench-"))
    os.environ["DECAPFLOW_HOME"] = str(home)
    env = {**os.environ, "DECAPFLOW_HOME": str(home)}
    report: dict[str, object] = {}
    if not args.skip_concurrent:
        report["write_path"] = [write_path(n) for n in (20_000, 200_000)]
        print(json.dumps(report["write_path"]), flush=True)
        report["concurrent_ingest"] = concurrent_ingest(env)
        print(json.dumps(report["concurrent_ingest"]), flush=True)

    import httpx

    from corpora.world import make_split, render
    from decapflow.bank.ingest import run_ingest
    from decapflow.decoder.registry import decoders
    from decapflow.decoder.train import TrainRecipe
    from decapflow.encoders import WORLD_DIR
    from decapflow.lifecycle.training import train_from_bank
    from tests.prefect_server import SET_PARAMETERS, Prefect

    run_ingest(WORLD_DIR / "corpus.txt.gz", "world", "world")
    champion, _ = train_from_bank("world", config="decap-small", progress=False,
                                  recipe=TrainRecipe(epochs=1, max_steps=args.champion_steps, num_threads=1))
    prefect = Prefect(home.parent / f"{home.name}-prefect", home)
    server = None
    try:
        for pool in ("cpu", "gpu"):
            prefect.run("work-pool", "create", pool, "--type", "process")
        prefect.run("--no-prompt", "deploy", "--all")
        sized = {"recipe": {"epochs": 1, "max_steps": args.steps, "num_threads": 1}, "min_new_rows": 1}
        prefect.python(SET_PARAMETERS, "decapflow-retrain-bank/retrain-on-ingest", json.dumps(sized))
        prefect.worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cpu"],
                                          env=prefect.env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
        from tests.conftest import free_port

        port = free_port()
        server = subprocess.Popen([str(BIN / "decapflow"), "serve", "--port", str(port), "--preload", "world",
                                   "--threads", "1", "--log-level", "warning"], env=env)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        png = home / "scene.png"
        render(make_split(1, 99)[0][0]).save(png)
        seen: list[tuple[float, int, str | None]] = []
        stop = threading.Event()

        def client() -> None:
            deadline = time.monotonic() + 900
            with httpx.Client(base_url=url, timeout=60) as http:
                while not stop.is_set() and time.monotonic() < deadline and len(seen) < 20000:
                    with png.open("rb") as f:
                        r = http.post("/v1/captions", data={"memory": "world"}, files=[("images", ("s.png", f))])
                    decoder = r.json()["results"][0]["decoder"] if r.is_success else None
                    seen.append((time.time(), r.status_code, decoder))
                    time.sleep(0.1)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        new = home / "new.txt"
        new.write_text("".join(texts[0] + "\n" for _, texts in make_split(args.new, 4242, n_captions=1)))
        report_ingest = subprocess.run([str(BIN / "decapflow"), "ingest", str(new), "--memory", "world", "--json",
                                        "--prefect", "off"], env=prefect.env, capture_output=True, text=True,
                                       timeout=600, check=True)
        ingested = time.time()
        added = json.loads(report_ingest.stdout)["written"]
        (run,) = prefect.wait_for_runs("retrain-on-ingest", 1, timeout=1200)
        reg = decoders()
        new_id = reg.current_id("world")
        record = reg.record("world", new_id if new_id != champion else reg.list("world")[-1]["id"])
        decision = record["decision"]
        served = next((t for t, _, d in seen if d == record["id"]), None)
        deadline = time.time() + 60
        while served is None and time.time() < deadline and decision["promoted"]:
            time.sleep(0.2)
            served = next((t for t, _, d in seen if d == record["id"]), None)
        stop.set()
        thread.join(timeout=120)
        def at(stamp: str) -> float:
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

        run_start, registered, decided = at(run["start_time"]), at(record["created"]), at(record["updated"])
        scores = record["scores"][decision["eval_set"]]
        report["loop"] = {
            "rows_added": added, "challenger": record["id"], "promoted": decision["promoted"],
            "metric": decision["metric"], "challenger_score": decision["challenger_score"],
            "champion_score": decision["champion_score"], "run_seconds": run["total_run_time"],
            "ingest_to_run_start_s": round(run_start - ingested, 1),
            "training_s": round(registered - run_start, 1),  # flow start, pinning, training, registering
            "gate_s": decision["seconds"], "score_challenger_s": scores["seconds"], "eval_sentences": scores["n"],
            "ingest_to_decision_s": round(decided - ingested, 1),
            "ingest_to_serving_s": round(served - ingested, 1) if served else None,
            "ingest_to_serving_without_training_s": round(served - ingested - (registered - run_start), 1)
            if served else None,
            "requests": len(seen), "non_200": sum(1 for _, s, _ in seen if s != 200),
        }
        print(json.dumps(report["loop"], indent=2))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        prefect.close()


if __name__ == "__main__":
    main()
