"""A real Prefect server on 127.0.0.1 with its own home, started as a subprocess, and helpers to drive it (deploy,
run deployments, read runs and events over its REST API). Used by the slow deployment tests and by
``benchmarks/retrain_side_by_side.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class Prefect:
    """A Prefect server on 127.0.0.1 with its own home, and helpers to run the CLI against it."""

    def __init__(self, tmp_path: Path, decapflow_home: Path) -> None:
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_SERVICES_")}
        self.env = {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": self.api,
                    "DECAPFLOW_PROJECT_DIR": str(ROOT), "DECAPFLOW_HOME": str(decapflow_home),
                    "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
                    "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
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

    def task_runs(self, *names: str) -> list[dict]:
        """Task runs called one of ``names`` (e.g. ``train-shapes``), with their start and end times."""
        return self.post("/task_runs/filter", {"task_runs": {"name": {"any_": list(names)}}})

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
