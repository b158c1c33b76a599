"""Ingest with embedding on a real local Dask cluster (worker processes): same bank as one process, ordered
commits, a worker killed mid-ingest loses nothing; and the Prefect flow on prefect-dask's DaskTaskRunner."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from decapflow.bank.ingest import run_ingest
from decapflow.bank.memory import Registry
from decapflow.cli import main

pytestmark = pytest.mark.slow  # worker processes import torch: ~10 s each start


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "things.txt"
    path.write_text("".join(f"a {c} {t} number {i}\n" for i in range(30) for c in ("red", "blue", "green")
                            for t in ("dog", "car", "tree", "house")))  # 360 sentences
    return path


def test_two_workers_build_the_same_bank_as_one_process(corpus: Path, tiny_encoder_spec: str) -> None:
    local = run_ingest(corpus, "one", tiny_encoder_spec, chunk_size=50)
    dask = run_ingest(corpus, "dask", tiny_encoder_spec, chunk_size=50, workers=2)
    assert local.written == dask.written == 360 and dask.chunks == local.chunks == 8
    texts_one, vectors_one = Registry().open("one").arrays()
    texts_dask, vectors_dask = Registry().open("dask").arrays()
    assert texts_dask == texts_one  # committed in corpus order
    np.testing.assert_allclose(vectors_dask, vectors_one, atol=1e-5)


def test_a_worker_killed_mid_ingest_loses_nothing(corpus: Path, tiny_encoder_spec: str) -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(report=run_ingest(
            corpus, "killed", tiny_encoder_spec, chunk_size=20, cluster=cluster.scheduler_address)))
        thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (Registry().exists("killed") and len(Registry().open("killed"))):
            time.sleep(0.05)
        pid = next(iter(client.run(os.getpid).values()))
        os.kill(pid, signal.SIGKILL)  # the nanny restarts it; the scheduler re-runs its chunks elsewhere
        thread.join(timeout=300)
    assert result["report"].written == 360
    texts = Registry().open("killed").arrays()[0]
    assert len(texts) == len(set(texts)) == 360


@pytest.mark.heavy  # a temporary Prefect server and a Dask cluster: two minutes on 2 cores
def test_prefect_flow_embeds_through_the_dask_task_runner(corpus: Path, tiny_encoder_spec: str) -> None:
    out = CliRunner().invoke(main, ["ingest", str(corpus), "--memory", "flowed", "--encoder", tiny_encoder_spec,
                                    "--chunk-size", "90", "--workers", "2", "--prefect", "on", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["written"] == 360 and report["chunks"] == 4 and report["prefect_seconds"] is not None
    assert Registry().open("flowed").arrays()[0][:2] == ["a red dog number 0", "a red car number 0"]
