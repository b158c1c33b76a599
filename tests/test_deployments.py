"""prefect.yaml against a real Prefect server on 127.0.0.1 and real process workers (slow: a server start, a deploy
and worker runs). The retraining loop end to end: ingest -> event -> triggered retrain -> gate -> a running server
captions with the new decoder, no restart and no failed request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY_STRONG = {"epochs": 150, "batch_size": 8, "lr": 1e-2, "warmup_steps": 10, "val_fraction": 0.0, "patience": None}
TINY_WEAK = {"epochs": 1, "max_steps": 1, "batch_size": 8, "lr": 1e-4, "val_fraction": 0.0}


class Prefect:
    """A Prefect server on 127.0.0.1 with its own home, and helpers to run the CLI against it."""

    def __init__(self, tmp_path: Path, decapflow_home: Path) -> None:
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_SERVICES_")}
        self.env = {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": self.api,
                    "DECAPFLOW_PROJECT_DIR": str(ROOT), "DECAPFLOW_HOME": str(decapflow_home),
                    "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
                    "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "HF_HUB_OFFLINE": "1"}
        self.log = tmp_path / "prefect-server.log"
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                        str(port)], env=self.env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.worker: subprocess.Popen | None = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.server.poll() is None:
            try:
                urllib.request.urlopen(self.api + "/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the Prefect server did not start: {self.log.read_text()[-2000:]}")

    def run(self, *args: str, timeout: int = 180, env: dict[str, str] | None = None) -> str:
        done = subprocess.run([str(BIN / "prefect"), *args], env=env or self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def python(self, code: str, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run([sys.executable, "-c", code, *args], env=env or self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def post(self, path: str, body: dict) -> list | dict:
        request = urllib.request.Request(self.api + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=10).read())

    def flow_runs(self, deployment: str) -> list[dict]:
        (dep,) = [d for d in self.post("/deployments/filter", {}) if d["name"] == deployment]
        return self.post("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}})

    def wait_for_runs(self, deployment: str, count: int, timeout: float = 240) -> list[dict]:
        """Until ``count`` runs of ``deployment`` ended; fails on a run that failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.flow_runs(deployment)
            assert not [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")], runs
            done = [r for r in runs if r["state_type"] == "COMPLETED"]
            if len(done) >= count:
                return done
            time.sleep(1)
        raise AssertionError(f"{deployment}: {count} completed runs expected within {timeout} s; have "
                             f"{[r['state_type'] for r in self.flow_runs(deployment)]}")

    def events(self, name: str, count: int = 1, timeout: float = 30) -> list[dict]:
        """Events called ``name``, waiting until there are ``count`` (the server stores events in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.post("/events/filter", {"filter": {"event": {"name": [name]}}, "limit": 50})["events"]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def close(self) -> None:
        for proc in (self.worker, self.server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture
def prefect(tmp_path: Path, decapflow_home: Path) -> Iterator[Prefect]:
    server = Prefect(tmp_path, decapflow_home)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.slow
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


SET_PARAMETERS = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate

async def main(name, parameters):
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        await client.update_deployment(deployment.id, DeploymentUpdate(
            parameters={**deployment.parameters, **json.loads(parameters)}))

asyncio.run(main(*sys.argv[1:]))
"""


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
