"""prefect.yaml against a real Prefect server on 127.0.0.1: deploy everything, run the ingest deployment
through a process worker (slow: a server start, a deploy and a worker run, ~1 minute)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deploy_all_and_run_ingest_through_a_worker(tmp_path: Path, decapflow_home: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "DECAPFLOW_PROJECT_DIR": str(ROOT), "DECAPFLOW_HOME": str(decapflow_home)}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(api + "/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.5)

        def prefect(*args: str, timeout: int = 120) -> str:
            done = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=timeout)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        for pool in ("cpu", "gpu"):
            prefect("work-pool", "create", pool, "--type", "process")
        out = prefect("--no-prompt", "deploy", "--all")
        for name in ("ingest", "train-cpu", "train-gpu", "nightly-retrain", "caption-folder"):
            assert name in out
        prefect("deployment", "run", "decapflow-ingest/ingest")
        prefect("worker", "start", "--pool", "cpu", "--run-once", timeout=300)
    finally:
        server.terminate()
        server.wait(timeout=30)
    from decapflow.memory import Registry

    assert len(Registry().open("world")) == 21106  # the world corpus's distinct sentences
