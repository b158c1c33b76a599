"""Curation beside a running ingest, in separate processes, on local disk and on moto's S3: a removal or a restore
never costs the ingest a row; purge and clone on S3 (slow: processes importing torch on two cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from decapflow.bank.history import history
from decapflow.bank.ingest import run_ingest
from decapflow.bank.matching import Criteria
from decapflow.bank.memory import Registry
from decapflow.lifecycle.removal import remove
from decapflow.lifecycle.rollback import restore
from tests.test_s3_store import keys, moto_endpoint, s3, s3_store  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "purple", "orange", "grey", "pink")
THINGS = ("dog", "cat", "bird", "car", "tree", "house", "boat", "cup", "lamp", "chair")


def sentences(prefix: str, n: int) -> list[str]:
    return [f"{prefix} {COLOURS[i % 10]} {THINGS[(i // 10) % 10]} number {i}" for i in range(n)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_ingest_running_through_a_removal_and_a_restore_keeps_all_its_rows(
        where: str, request: pytest.FixtureRequest, tmp_path: Path, tiny_encoder_spec: str) -> None:
    """Deterministic: between two of the ingest's chunk commits (where it holds no lease), another writer removes
    rows of an older file and restores the bank to before the ingest began; the ingest goes on and, when it ends,
    writes again what the restore took out of its file."""
    from decapflow.bank.ingest import write_chunk

    store = request.getfixturevalue("s3_store") if where == "s3" else None
    old, new = sentences("an old", 60), sentences("a new", 200)
    (tmp_path / "old.txt").write_text("".join(s + "\n" for s in old))
    (tmp_path / "new.txt").write_text("".join(s + "\n" for s in new))
    run_ingest(tmp_path / "old.txt", "busy", tiny_encoder_spec, store)
    before = Registry(store).open("busy").version
    done: dict = {}

    def write(*args, **kwargs) -> int:
        written = write_chunk(*args, **kwargs)
        if len(done) == 0 and Registry(store).open("busy").table.count_rows("source = 'new.txt'") >= 40:
            done["removed"] = remove("busy", Criteria(pattern="^an old red "), store=store).removed
            done["restore"] = restore("busy", version=before, store=store)
        return written

    report = run_ingest(tmp_path / "new.txt", "busy", tiny_encoder_spec, store, chunk_size=20, write=write)
    assert done["removed"] == 6 and done["restore"]["rows_removed"] >= 40  # both happened mid-ingest
    assert report.rewritten == done["restore"]["rows_removed"] and report.chunks > 10
    texts = set(Registry(store).open("busy").arrays()[0])
    assert set(new) <= texts  # every row of the running ingest, after all
    assert set(old) <= texts  # the restore brought the removed rows back, too
    entries = {e["op"]: e for e in history(store, "busy")}  # (the last of each kind)
    assert entries["ingest"]["version"] > entries["restore"]["version"] > entries["remove"]["version"]


def test_purge_and_clone_on_s3(s3_store: str, s3, tmp_path: Path, tiny_encoder_spec: str) -> None:  # noqa: F811
    secret = "a teal rhombus belonging to zqxj at example dot org"
    (tmp_path / "a.txt").write_text("".join(s + "\n" for s in sentences("a", 30)) + secret + "\n")
    run_ingest(tmp_path / "a.txt", "busy", tiny_encoder_spec, s3_store, chunk_size=10)
    from decapflow.lifecycle.cloning import clone

    made = clone("busy", "trial", store=s3_store)
    assert made["rows"] == 31 and not [k for k in keys(s3, s3_store, "trial.lance") if k.startswith("data/")]
    assert len(Registry(s3_store).open("trial")) == 31
    bucket, _, prefix = s3_store.removeprefix("s3://").partition("/")

    def objects_holding() -> list[str]:
        found = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if secret.encode() in s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read():
                    found.append(item["Key"])
        return found

    assert objects_holding()
    with pytest.raises(ValueError, match="shallow clone"):
        remove("busy", Criteria(pattern="zqxj"), store=s3_store, purge=True)
    from decapflow.lifecycle.deletion import delete_bank

    delete_bank("trial", s3_store)
    report = remove("busy", Criteria(pattern="zqxj"), store=s3_store, purge=True)
    assert report.removed == 1 and report.purged["versions_removed"] > 0
    assert objects_holding() == []
    assert len(Registry(s3_store).open("busy")) == 30


def test_removal_and_restore_events_reach_prefect_and_the_retrain_trigger(own_home: Path, tmp_path: Path) -> None:
    import yaml

    from tests.prefect_server import ROOT, Prefect

    trigger = next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "retrain-on-ingest")["triggers"][0]
    assert {"decapflow.bank.removed", "decapflow.bank.restored"} <= set(trigger["expect"])
    prefect = Prefect(tmp_path, own_home)
    try:  # the CLI in its own process, as a user runs it (this process's Prefect settings stay untouched)
        env = {**os.environ, "PREFECT_API_URL": prefect.api, "DECAPFLOW_HOME": str(own_home)}
        for args in (["remove", "shapes", "--match", "circle"], ["restore", "shapes", "--version", "2"]):
            subprocess.run([sys.executable, "-m", "decapflow.cli", "memory", *args], env=env, check=True,
                           capture_output=True, timeout=120)
        (event,) = prefect.events("decapflow.bank.removed")
        assert event["resource"]["prefect.resource.id"] == "decapflow.bank.shapes"
        assert event["payload"]["rows_removed"] == 3 and list(event["payload"]["stale_decoders"].values()) == [3]
        (event,) = prefect.events("decapflow.bank.restored")
        assert event["payload"]["rows_added"] == 3 and event["payload"]["restored"] == 2
    finally:
        prefect.close()
