"""Maintenance: health before and after on a bank fed by many small writes, tagged versions kept, the ANN index
brought up to date, the store's own tables, ``memory maintain`` and ``memory show``'s line. Tiny banks of random
unit vectors (the slow ones, beside an ingest and on a Prefect server, are in test_maintenance_slow.py)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from click.testing import CliRunner

from decapflow.bank.maintenance import format_retention, health
from decapflow.bank.memory import Registry
from decapflow.bank.versions import set_tag
from decapflow.cli import main
from decapflow.errors import BankError
from decapflow.lifecycle.maintenance import maintain_bank, maintain_store, parse_retention, store_tables

DIM = 8


def unit(rows: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def add(bank, texts: list[str], seed: int) -> int:
    return bank.add([f"h{abs(hash(t))}" for t in texts], texts, unit(len(texts), seed), source=f"part-{seed}.txt",
                    added_at=datetime.now(timezone.utc))


def fed(name: str = "feed", writes: int = 30, rows: int = 3):
    """A bank fed by ``writes`` small writes of ``rows`` sentences: a version and a fragment each."""
    bank = Registry().create(name, "tiny.json:random", DIM)
    for i in range(writes):
        add(bank, [f"{name} sentence {i}-{j}" for j in range(rows)], i)
    return bank


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_retentions_parse_and_print() -> None:
    for text, delta in (("7d", timedelta(days=7)), ("12h", timedelta(hours=12)), ("30m", timedelta(minutes=30)),
                        ("45s", timedelta(seconds=45)), ("2w", timedelta(days=14)), ("0", timedelta(0)),
                        (" 3D ", timedelta(days=3)), (timedelta(hours=1), timedelta(hours=1))):
        assert parse_retention(text) == delta
    for bad in ("7", "-1d", "7 days", "1.5d", "d", "", "1d12h"):
        with pytest.raises(BankError, match="invalid retention"):
            parse_retention(bad)
    assert [format_retention(parse_retention(t)) for t in ("7d", "36h", "30m", "0", "90s", "2w")] == \
        ["7d", "36h", "30m", "0", "90s", "14d"]


def test_many_small_writes_need_maintenance_and_get_it_tagged_versions_kept() -> None:
    bank = fed()
    set_tag(bank, "early", 5)  # version 5: the bank's first 4 writes (version 1 is the empty bank)
    early = Registry().open("feed@early").arrays()[0]
    texts = sorted(bank.arrays()[0])
    before = health(bank, timedelta(0))
    assert (before["fragments"], before["small_fragments"], before["versions"]) == (30, 30, 31)
    assert before["versions_past_retention"] == 29 and before["tagged_versions"] == 1  # not the newest, not v5
    assert [n.split(" ")[1] for n in before["needs"]] == ["small", "versions"], before["needs"]
    assert health(bank)["needs"] == [before["needs"][0]]  # nothing is 7 days old yet

    result = maintain_bank("feed", "0")
    assert (result["fragments_before"], result["fragments"]) == (30, 1)
    assert result["versions_removed"] == 29 and result["versions"] == 2  # the newest and the tagged v5
    assert result["needs_before"] == before["needs"] and result["needs"] == []
    assert result["bytes_freed"] > 0 and result["mb_freed"] == round(result["bytes_freed"] / 1e6, 3)
    after = health(Registry().open("feed"), timedelta(0))
    assert after["needs"] == [] and after["versions_past_retention"] == 0 and after["tagged_versions"] == 1
    assert sorted(Registry().open("feed").arrays()[0]) == texts  # same rows
    assert Registry().open("feed@early").arrays()[0] == early  # the tagged version still reads
    assert [v["version"] for v in Registry().open("feed").versions()][0] == 5
    from decapflow.bank.history import history

    entry = history(None, "feed")[-1]
    assert entry["op"] == "maintain" and entry["details"]["versions_removed"] == 29


def test_a_real_retention_compacts_but_keeps_young_versions() -> None:
    fed(writes=12)
    reader = Registry().open("feed")  # a reader (a server, a training) that opened the bank before maintenance
    rows = sorted(reader.arrays()[0])
    result = maintain_bank("feed", "7d")
    assert sorted(reader.arrays()[0]) == rows  # its version's files are still there
    assert (result["fragments_before"], result["fragments"], result["versions_removed"]) == (12, 1, 0)
    bank = Registry().open("feed")
    kept = [v["version"] for v in bank.versions()]
    assert kept[:13] == list(range(1, 14)) and len(kept) == result["versions"] > 13  # + the compaction's commits
    assert Registry().open("feed@v3").arrays()[0]  # an old version still reads
    again = maintain_bank("feed", "7d")  # nothing to do: no new version
    assert again["version"] == again["version_before"] and again["fragments"] == 1
    maintain_bank("feed", "0")  # what --retain 0 means for that reader: its version is gone
    with pytest.raises(Exception, match="(?i)not found|no such file"):
        reader.arrays()


def test_maintenance_adds_new_rows_to_the_ann_index() -> None:
    bank = Registry().create("indexed", "tiny.json:random", DIM)
    add(bank, [f"row {i}" for i in range(4200)], 0)
    bank.build_index(partitions=8, iterations=2)
    assert health(bank)["unindexed_rows"] == 0 and health(bank)["needs"] == []
    add(bank, [f"new row {i}" for i in range(100)], 1)
    assert health(bank)["unindexed_rows"] == 100 and health(bank)["needs"] == []  # 2%: not yet worth it
    add(bank, [f"more row {i}" for i in range(200)], 2)
    before = health(bank)
    assert before["index"] == "ivf_flat" and before["unindexed_rows"] == 300
    assert any("since the ANN index was built" in n for n in before["needs"])
    result = maintain_bank("indexed", "7d")
    assert (result["unindexed_before"], result["unindexed"]) == (300, 0)
    assert health(Registry().open("indexed"))["needs"] == []
    hits = Registry().open("indexed").ann_neighbors(unit(1, 1)[0], k=3)[1][0]
    assert hits[0] == "new row 0"  # a new row, found through the index


def test_deleted_rows_are_a_reason_and_compaction_drops_them() -> None:
    from decapflow.bank.history import Change
    from decapflow.bank.versions import delete_rows

    bank = Registry().create("holes", "tiny.json:random", DIM)
    add(bank, [f"row {i}" for i in range(100)], 0)
    delete_rows(bank, [f"h{abs(hash(f'row {i}'))}" for i in range(30)], Change("remove"))
    before = health(Registry().open("holes"))
    assert before["deleted_rows"] == 30 and any("deleted rows" in n for n in before["needs"])
    maintain_bank("holes", "7d")
    after = health(Registry().open("holes"))
    assert after["deleted_rows"] == 0 and after["rows"] == 70 and after["needs"] == []


def test_store_maintenance_goes_on_past_a_failing_bank_and_keeps_to_its_own_tables() -> None:
    fed("a", writes=10)
    fed("b", writes=10)
    report = maintain_store(None, "0", banks=["a", "nope", "b"])
    assert [r["bank"] for r in report["banks"]] == ["a", "nope", "b"]
    assert "UnknownBank" in report["banks"][1]["error"] and report["failed"] == ["nope"]
    assert [r["fragments"] for r in report["banks"] if "error" not in r] == [1, 1]
    tables = {t["table"]: t for t in report["tables"]}
    assert "_history" in tables and not any(t.startswith("_lock-") for t in tables)
    assert tables["_history"]["versions"] == 1 and tables["_history"]["fragments"] == 1
    assert any(t.startswith("_lock-") for t in _all_tables())  # there, and left alone
    with pytest.raises(BankError, match="invalid retention"):
        maintain_store(None, "soon")


def _all_tables() -> list[str]:
    return list(Registry().db.list_tables().tables)


def test_cli_maintain_and_show(decapflow_home) -> None:
    fed(writes=20)
    shown = invoke("memory", "show", "feed")
    assert shown.exit_code == 0, shown.output
    assert "maintenance needed: decapflow memory maintain feed\n  - 20 small fragments" in shown.output
    as_json = json.loads(invoke("memory", "show", "feed", "--json").output)
    assert as_json["health"]["small_fragments"] == 20 and len(as_json["health"]["needs"]) == 1

    out = invoke("memory", "maintain", "feed")
    assert out.exit_code == 0, out.output
    assert out.output.startswith("bank 'feed': 0 old versions removed, 0.0 MB freed, fragments 20 -> 1, disk ")
    assert "no ANN index" in out.output and out.output.rstrip().endswith(" s")
    assert "maintenance fine" in invoke("memory", "show", "feed").output
    assert "maintenance fine" in invoke("memory", "show", "feed@v3").output  # the bank's health, whatever version

    out = invoke("memory", "maintain", "feed", "--retain", "0", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["versions_removed"] == data["versions_before"] - 1 > 21 and data["retain"] == "0"
    assert data["health"]["versions"] == 1

    fed("other", writes=9)
    out = invoke("memory", "maintain", "--all", "--retain", "30m")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].startswith("bank 'feed': ") and lines[1].startswith("bank 'other': 0 old versions removed")
    assert "fragments 9 -> 1" in lines[1] and any(line.startswith("table _history: ") for line in lines)
    assert lines[-1].startswith("2 bank(s) maintained (retain 30m), ")
    report = json.loads(invoke("memory", "maintain", "--all", "--json").output)
    assert [b["bank"] for b in report["banks"]] == ["feed", "other"] and report["failed"] == []


def test_cli_maintain_refuses_bad_input_before_touching_anything() -> None:
    fed(writes=3)
    version = Registry().open("feed").version
    for args, message in ((["feed", "--retain", "7"], "invalid retention"), ([], "give a bank NAME, or --all"),
                          (["feed", "--all"], "give a bank NAME, or --all"), (["feed@v2"], "pins a version"),
                          (["nope"], "no memory bank named 'nope'")):
        out = invoke("memory", "maintain", *args)
        assert out.exit_code != 0 and message in out.output, (args, out.output)
    assert Registry().open("feed").version == version
    assert "Retention:" in invoke("memory", "maintain", "--help").output


def test_cli_maintain_all_fails_naming_the_bank_that_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    fed("a", writes=3)
    fed("b", writes=3)
    import decapflow.lifecycle.maintenance as maintenance

    real = maintenance.optimize_bank

    def flaky(bank, *args, **kwargs):
        if bank.name == "a":
            raise OSError("the store did not answer")
        return real(bank, *args, **kwargs)

    monkeypatch.setattr(maintenance, "optimize_bank", flaky)
    out = invoke("memory", "maintain", "--all")
    assert out.exit_code == 1
    assert "bank 'a': FAILED: OSError: the store did not answer" in out.output
    assert "bank 'b': 0 old versions removed" in out.output and "maintenance failed for: a" in out.output
    assert store_tables(Registry().store) == ["_history"]
