"""prefect.yaml against a real Prefect server on 127.0.0.1 and real process workers (slow: a server start, a deploy
and worker runs). The retraining loop end to end: ingest -> event -> triggered retrain -> gate -> a running server
captions with the new decoder, no restart and no failed request."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.prefect_server import BIN, ROOT, SET_PARAMETERS, Prefect

TINY_STRONG = {"epochs": 150, "batch_size": 8, "lr": 1e-2, "warmup_steps": 10, "val_fraction": 0.0, "patience": None}
TINY_WEAK = {"epochs": 1, "max_steps": 1, "batch_size": 8, "lr": 1e-4, "val_fraction": 0.0}


@pytest.fixture
def prefect(tmp_path: Path, decapflow_home: Path) -> Iterator[Prefect]:
    server = Prefect(tmp_path, decapflow_home)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.heavy  # deploy --all and a worker run; the event-driven retrain test below deploys and runs too
def test_deploy_all_and_run_ingest_through_a_worker(prefect: Prefect) -> None:
    for pool in ("cpu", "gpu"):
        prefect.run("work-pool", "create", pool, "--type", "process")
    out = prefect.run("--no-prompt", "deploy", "--all")
    for name in ("ingest", "train-cpu", "train-gpu", "retrain-on-ingest", "nightly-retrain", "caption-folder"):
        assert name in out
    prefect.run("deployment", "run", "decapflow-ingest/ingest")
    prefect.run("worker", "start", "--pool", "cpu", "--run-once", timeout=300)
    from decapflow.bank.memory import Registry

    assert len(Registry().open("world")) == 21106  # the world corpus's distinct sentences
    (event,) = prefect.events("decapflow.bank.updated")
    assert event["resource"]["prefect.resource.id"] == "decapflow.bank.world"
    assert event["payload"]["rows_added"] == 21106


@pytest.mark.slow
def test_ingest_event_triggers_a_gated_retrain_that_a_running_server_picks_up(
        prefect: Prefect, trained_home: Path, decapflow_home: Path, tmp_path: Path, serve_app,
        monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(trained_home, decapflow_home)
    monkeypatch.setenv("DECAPFLOW_HOME", str(decapflow_home))
    from decapflow.decoder.registry import decoders
    from decapflow.lifecycle.training import train_bank

    weak = train_bank("shapes", "tiny", TINY_WEAK, progress=False)["decoder"]  # by hand: a poor decoder is current
    reg = decoders()
    assert reg.current_id("shapes") == weak

    for pool in ("cpu", "gpu"):
        prefect.run("work-pool", "create", pool, "--type", "process")
    prefect.run("--no-prompt", "deploy", "--all")
    # The deployments of prefect.yaml, sized for a test: the tiny decoder, a recipe that learns 8 sentences.
    sized = {"config": "tiny", "recipe": TINY_STRONG, "min_new_rows": 1}
    prefect.python(SET_PARAMETERS, "decapflow-retrain-bank/retrain-on-ingest", json.dumps(sized))
    prefect.python(SET_PARAMETERS, "decapflow-retrain/nightly-retrain", json.dumps({**sized, "recipe": TINY_WEAK}))
    prefect.worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cpu"], env=prefect.env,
                                      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # A running server, and a client that keeps captioning through the whole retrain (bounded in count and time).
    url = serve_app(preload=["shapes"])
    from PIL import Image

    png = tmp_path / "red.png"
    Image.new("RGB", (48, 40), "red").save(png)
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set() and len(answers) < 3000 and time.monotonic() < deadline:
                with png.open("rb") as f:
                    response = http.post("/v1/captions", data={"memory": "shapes"}, files=[("images", ("red.png", f))])
                body = response.json()
                answers.append((response.status_code, body["results"][0]["decoder"] if response.is_success else
                                json.dumps(body)))
                time.sleep(0.05)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()

    # Ingest with the Prefect server configured: the ingest emits decapflow.bank.updated, the trigger starts the
    # retrain deployment, the worker runs it.
    extra = tmp_path / "extra.txt"
    extra.write_text("a pink hexagon\nan orange oval\n")
    ingest = subprocess.run([str(BIN / "decapflow"), "ingest", str(extra), "--memory", "shapes", "--prefect", "off"],
                            env={**prefect.env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert ingest.returncode == 0, ingest.stderr
    ingested = time.monotonic()
    (run,) = prefect.wait_for_runs("retrain-on-ingest", 1)
    assert run["parameters"]["bank"] == "shapes"
    new = reg.current_id("shapes")
    assert new != weak and reg.record("shapes", new)["parent"] == weak
    decision = reg.record("shapes", new)["decision"]
    assert decision["promoted"] and decision["challenger_score"] > decision["champion_score"]
    assert [e["resource"]["prefect.resource.name"] for e in prefect.events("decapflow.decoder.promoted")] == [new]

    while time.monotonic() - ingested < 120 and not (answers and answers[-1][1] == new):
        time.sleep(0.2)  # the server notices the new current decoder on its next batch
    serving_s = time.monotonic() - ingested

    # The nightly fallback, run now: the bank changed again (no event this time); its challenger is worse.
    more = tmp_path / "more.txt"
    more.write_text("a grey rhombus\n")
    quiet = {k: v for k, v in prefect.env.items() if k != "PREFECT_API_URL"}
    subprocess.run([str(BIN / "decapflow"), "ingest", str(more), "--memory", "shapes", "--prefect", "off"],
                   env={**quiet, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True, timeout=120)
    prefect.run("deployment", "run", "decapflow-retrain/nightly-retrain")
    prefect.wait_for_runs("nightly-retrain", 1)
    stop.set()
    thread.join(timeout=60)

    rejected = [d for d in reg.list("shapes") if d["status"] == "rejected"]
    assert len(rejected) == 1 and reg.current_id("shapes") == new  # the worse nightly challenger did not replace it
    assert len(prefect.events("decapflow.decoder.rejected")) == 1
    statuses = {status for status, _ in answers}
    assert statuses == {200}, [a for a in answers if a[0] != 200][:3]
    served = [decoder for _, decoder in answers]
    assert set(served) <= {weak, new} and served[-1] == new and weak in served
    print(f"\ningest -> new decoder serving: {serving_s:.1f} s; {len(answers)} requests, all 200")


LONG_TINY = {"epochs": 150, "batch_size": 1, "lr": 1e-3, "warmup_steps": 10, "val_fraction": 0.0, "patience": None}


@pytest.mark.slow
@pytest.mark.heavy  # three trainings through a worker: minutes
def test_trainings_of_different_banks_overlap_and_of_one_bank_do_not(
        prefect: Prefect, trained_home: Path, decapflow_home: Path, tmp_path: Path, tiny_encoder_spec: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(trained_home, decapflow_home)
    monkeypatch.setenv("DECAPFLOW_HOME", str(decapflow_home))
    from decapflow.bank.ingest import run_ingest
    from tests.conftest import SENTENCES

    corpus = tmp_path / "more-shapes.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    run_ingest(corpus, "shapes2", tiny_encoder_spec)
    for pool in ("cpu", "gpu"):
        prefect.run("work-pool", "create", pool, "--type", "process")
    prefect.run("--no-prompt", "deploy", "--all")
    prefect.python(SET_PARAMETERS, "decapflow-train/train-cpu",
                   json.dumps({"config": "tiny", "recipe": LONG_TINY, "log_every_s": 1.0}))
    for bank in ("shapes", "shapes", "shapes2"):  # all three at once; the machine allows 2 trainings (2 CPUs)
        prefect.run("deployment", "run", "decapflow-train/train-cpu", "-p", f"bank={bank}")
    prefect.worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cpu"], env=prefect.env,
                                      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = prefect.wait_for_runs("train-cpu", 3, timeout=400)
    assert sorted(r["name"] for r in runs) == ["train-shapes", "train-shapes", "train-shapes2"]

    def interval(task_run: dict) -> tuple[datetime, datetime]:
        return datetime.fromisoformat(task_run["start_time"]), datetime.fromisoformat(task_run["end_time"])

    trainings = prefect.task_runs("train-shapes", "train-shapes2")
    same = sorted(interval(t) for t in trainings if t["name"] == "train-shapes")
    (other,) = [interval(t) for t in trainings if t["name"] == "train-shapes2"]
    assert len(same) == 2 and same[0][1] <= same[1][0], same  # one bank: one after the other
    overlap = max(min(other[1], s[1]) - max(other[0], s[0]) for s in same).total_seconds()
    assert overlap > 0, (other, same)  # two banks: side by side
    logs = prefect.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [r["id"] for r in runs]}}, "limit": 200})
    messages = [log["message"] for log in logs]
    assert sum(m.startswith("validation after epoch") for m in messages) >= 3
    assert any(m.startswith("slots acquired after") for m in messages)
    print(f"\ntwo banks overlapped {overlap:.1f} s; one bank's trainings ran "
          f"{(same[1][0] - same[0][1]).total_seconds():.1f} s apart")
