"""Maintenance between the chunks of a running ingest, on local disk and on moto's S3, and the
``nightly-maintenance`` deployment of prefect.yaml on a real Prefect server with a worker (slow: processes importing
torch, a Prefect server)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from decapflow.bank.ingest import run_ingest
from decapflow.bank.memory import Registry
from decapflow.lifecycle.maintenance import maintain_bank
from tests.prefect_server import ROOT, Prefect
from tests.test_s3_store import moto_endpoint, s3, s3_store  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

WORDS = ("red", "blue", "green", "small", "large")
THINGS = ("dog", "cat", "bird", "car", "tree", "house")


def maintain_beside_an_ingest(store: str | None, folder: Path, encoder: str) -> list[dict]:
    """Deterministic: an ingest of 400 sentences in chunks of 25, and between every fourth pair of its chunk
    commits (where it holds no lease) another writer maintains the bank with retain 0, compacting the fragments the
    chunks added and removing every old version; every sentence must be in the bank afterwards, once. Returns the
    maintenance results."""
    from decapflow.bank.ingest import write_chunk

    sentences = [f"a {w} {t} number {i}" for i in range(14) for w in WORDS for t in THINGS]
    first, second = sentences[:20], sentences[20:]
    (folder / "first.txt").write_text("".join(s + "\n" for s in first))
    (folder / "second.txt").write_text("".join(s + "\n" for s in second))
    run_ingest(folder / "first.txt", "busy", encoder, store)  # the bank exists before the race
    results: list[dict] = []
    chunks = [0]

    def write(*args, **kwargs) -> int:
        written = write_chunk(*args, **kwargs)
        chunks[0] += 1
        if chunks[0] % 4 == 0:
            results.append(maintain_bank("busy", "0", store))
        return written

    report = run_ingest(folder / "second.txt", "busy", encoder, store, chunk_size=25, write=write)
    assert report.written == len(second) and len(results) >= 3
    final = maintain_bank("busy", "0", store)
    texts = Registry(store).open("busy").arrays()[0]
    assert len(texts) == len(set(texts)) == len(sentences)  # nothing lost, nothing twice
    assert sorted(texts) == sorted(sentences)
    assert final["fragments"] == 1 and final["versions"] == 1
    # Maintenance ran between the ingest's chunks: each time it found the fragments four chunks had added.
    assert all(r["fragments_before"] > 1 for r in results), [r["fragments_before"] for r in results]
    return results


def test_maintenance_beside_an_ingest_loses_nothing_locally(tmp_path: Path, tiny_encoder_spec: str) -> None:
    results = maintain_beside_an_ingest(None, tmp_path, tiny_encoder_spec)
    print(f"\n{len(results)} maintenance runs beside the ingest; fragments found: "
          f"{[r['fragments_before'] for r in results]}")


def test_maintenance_beside_an_ingest_loses_nothing_on_s3(s3_store: str, tmp_path: Path,  # noqa: F811
                                                         tiny_encoder_spec: str) -> None:
    results = maintain_beside_an_ingest(s3_store, tmp_path, tiny_encoder_spec)
    assert all(r["seconds"] < 60 for r in results)


# ---------------------------------------------------------------------------------------------- the deployment
@pytest.fixture
def prefect(tmp_path: Path, decapflow_home: Path) -> Iterator[Prefect]:
    server = Prefect(tmp_path, decapflow_home)
    try:
        yield server
    finally:
        server.close()


def fed(name: str, writes: int, dim: int = 8) -> None:
    bank = Registry().create(name, "tiny.json:random", dim)
    rng = np.random.default_rng(0)
    for i in range(writes):
        v = rng.standard_normal((2, dim)).astype(np.float32)
        bank.add([f"{name}{i}a", f"{name}{i}b"], [f"{name} {i} a", f"{name} {i} b"], v / np.linalg.norm(v, axis=1,
                 keepdims=True), source=f"{i}.txt", added_at=datetime.now(timezone.utc))


def runs_ended(prefect: Prefect, deployment: str, count: int, timeout: float = 240) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = [r for r in prefect.flow_runs(deployment) if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
        if len(ended) >= count:
            return sorted(ended, key=lambda r: r["created"])
        time.sleep(1)
    raise AssertionError(f"{deployment}: {count} ended runs expected within {timeout} s")


def maintenance_artifacts(prefect: Prefect) -> list[dict]:
    """Every version of the ``maintenance`` artifact, oldest first."""
    found = prefect.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["maintenance"]}}})
    return sorted(found, key=lambda a: a["created"])


def test_nightly_maintenance_deployment_runs_every_bank_and_leaves_its_artifact(prefect: Prefect) -> None:
    fed("alpha", 25)
    fed("beta", 12)
    for pool in ("cpu", "gpu"):
        prefect.run("work-pool", "create", pool, "--type", "process")
    out = prefect.run("--no-prompt", "deploy", "--all")
    assert "nightly-maintenance" in out
    (deployment,) = [d for d in prefect.post("/deployments/filter", {}) if d["name"] == "nightly-maintenance"]
    assert deployment["parameters"] == {"retain": "7d"}
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "0 4 * * *" and schedule["schedule"]["timezone"] == "UTC"

    prefect.run("deployment", "run", "decapflow-maintain/nightly-maintenance", "-p", "retain=0")
    prefect.run("worker", "start", "--pool", "cpu", "--run-once", timeout=300)
    (run,) = runs_ended(prefect, "nightly-maintenance", 1)
    assert run["state_type"] == "COMPLETED" and run["name"] == "maintain-banks", run
    for name, writes in (("alpha", 25), ("beta", 12)):
        bank = Registry().open(name)
        assert len(bank.versions()) == 1 and bank.table.stats()["fragment_stats"]["num_fragments"] == 1
        assert len(bank) == 2 * writes
    (artifact,) = maintenance_artifacts(prefect)
    assert artifact["type"] == "table" and artifact["flow_run_id"] == run["id"]
    rows = {r["bank"]: r for r in json.loads(artifact["data"])}
    assert rows["alpha"]["fragments"] == "25 -> 1" and rows["alpha"]["versions removed"] >= 25
    assert rows["beta"]["fragments"] == "12 -> 1" and rows["beta"]["result"] == "ok"
    assert rows["alpha"]["MB freed"] > 0 and rows["_history"]["versions removed"] > 0
    assert "retain 0" in artifact["description"]
    logs = [log["message"] for log in prefect.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}},
                                                                    "limit": 200})]
    assert any(m.startswith("bank 'alpha': ") and "fragments 25 -> 1" in m for m in logs), logs

    # One bank failing: the others are maintained, the run fails at the end naming it, the artifact shows it.
    fed("gamma", 9)
    prefect.run("deployment", "run", "decapflow-maintain/nightly-maintenance", "-p",
                'banks=["gamma", "nope"]', "-p", "retain=0")
    prefect.run("worker", "start", "--pool", "cpu", "--run-once", timeout=300)
    failed = runs_ended(prefect, "nightly-maintenance", 2)[-1]
    assert failed["state_type"] == "FAILED" and "nope" in failed["state"]["message"], failed["state"]
    assert Registry().open("gamma").table.stats()["fragment_stats"]["num_fragments"] == 1
    latest = maintenance_artifacts(prefect)[-1]
    rows = {r["bank"]: r for r in json.loads(latest["data"])}
    assert rows["gamma"]["fragments"] == "9 -> 1" and rows["nope"]["result"].startswith("failed: UnknownBank")
    print(f"\nmaintenance artifact of the first run:\n{json.dumps(json.loads(artifact['data']), indent=1)}")


def test_prefect_yaml_names_the_flow() -> None:
    import yaml

    (dep,) = [d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
              if d["name"] == "nightly-maintenance"]
    assert dep["entrypoint"] == "flows/maintain.py:nightly_maintenance_flow" and dep["work_pool"]["name"] == "cpu"
