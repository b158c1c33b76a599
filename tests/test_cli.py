from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from decapflow.cli import main


def run(*args: str, input: str | None = None, ok: bool = True):
    result = CliRunner().invoke(main, list(args), input=input)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "shapes.txt"
    path.write_text("a red circle\na blue square\na red circle\n\ntwo green triangles\na red circle on the left\n")
    return path


def test_ingest_then_inspect_the_bank(corpus: Path, tiny_encoder_spec: str, tmp_path: Path) -> None:
    out = run("ingest", str(corpus), "--encoder", tiny_encoder_spec, "--prefect", "off", "--json")
    report = json.loads(out.stdout)
    assert (report["bank"], report["written"], report["corpus"]["duplicates"]) == ("shapes", 4, 1)
    assert report["prefect_seconds"] is None
    text = run("ingest", str(corpus), "--prefect", "off").output
    assert "written 0" in text and "already stored 4" in text

    listing = json.loads(run("memory", "list", "--json").stdout)
    assert [(b["name"], b["rows"], b["dim"]) for b in listing] == [("shapes", 4, 32)]
    info = json.loads(run("memory", "show", "shapes", "--json").stdout)
    assert {"name", "rows", "encoder", "dim", "versions"} <= set(info)
    assert info["rows"] == 4 and info["encoder"] == tiny_encoder_spec and len(info["versions"]) == 2
    human = run("memory", "show", "shapes").output
    assert "rows      4" in human and "from shapes.txt" in human

    hits = json.loads(run("memory", "search", "shapes", "a red circle", "-k", "2", "--json").stdout)
    assert hits[0]["text"] == "a red circle" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(hits) == 2

    run("memory", "export", "shapes", str(tmp_path / "out.txt"))
    assert len((tmp_path / "out.txt").read_text().splitlines()) == 4


def test_rm_asks_for_confirmation(corpus: Path, tiny_encoder_spec: str) -> None:
    run("ingest", str(corpus), "--encoder", tiny_encoder_spec, "--prefect", "off")
    refused = run("memory", "rm", "shapes", input="n\n", ok=False)
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert json.loads(run("memory", "list", "--json").stdout)[0]["name"] == "shapes"
    run("memory", "rm", "shapes", input="y\n")
    assert json.loads(run("memory", "list", "--json").stdout) == []
    run("ingest", str(corpus), "--encoder", tiny_encoder_spec, "--prefect", "off")
    run("memory", "rm", "shapes", "--yes")
    assert "no memory banks" in run("memory", "list").output


def test_errors_are_one_clear_line(corpus: Path, tiny_encoder_spec: str) -> None:
    missing = run("memory", "show", "nope", ok=False)
    assert missing.exit_code == 1 and "no memory bank named 'nope'" in missing.output
    assert "Traceback" not in missing.output
    bad = run("ingest", str(corpus), "--memory", "bad name", "--encoder", tiny_encoder_spec, "--prefect", "off",
              ok=False)
    assert bad.exit_code == 1 and "invalid bank name" in bad.output
    run("ingest", str(corpus), "--encoder", tiny_encoder_spec, "--prefect", "off")
    mixed = run("ingest", str(corpus), "--encoder", "ViT-B-32:openai", "--prefect", "off", ok=False)
    assert "holds embeddings of encoder" in mixed.output
    offline = run("ingest", str(corpus), "--memory", "other", "--encoder", "RN50:openai", "--prefect", "off",
                  ok=False)
    assert "could not load encoder 'RN50:openai'" in offline.output and "Traceback" not in offline.output


def test_help_teaches() -> None:
    top = run("--help").output
    for word in ("ingest", "memory", "DECAPFLOW_HOME", "world"):
        assert word in top
    assert "--memory" in run("ingest", "--help").output and "jsonl" in run("ingest", "--help").output


def test_dead_prefect_server_never_waited_on(corpus: Path, tiny_encoder_spec: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens on port 9
    start = time.perf_counter()
    forced = run("ingest", str(corpus), "--encoder", tiny_encoder_spec, "--prefect", "on", ok=False)
    assert "does not answer" in forced.output and time.perf_counter() - start < 10
    auto = run("ingest", str(corpus), "--encoder", tiny_encoder_spec)
    assert "does not answer; running in-process" in auto.output and "written 4" in auto.output


def test_ingest_as_a_prefect_flow(corpus: Path, tiny_encoder_spec: str) -> None:
    """A real Prefect flow run on a temporary local server (the first call pays its start-up)."""
    out = run("ingest", str(corpus), "--encoder", tiny_encoder_spec, "--prefect", "on", "--json")
    report = json.loads(out.stdout)
    assert report["written"] == 4 and report["prefect_seconds"] is not None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        tasks = client.read_task_runs()
    assert any(r.name and r.state.is_completed() for r in runs)
    assert {"embed-chunk", "write-chunk"} <= {t.name.rsplit("-", 1)[0] for t in tasks}


def test_ingest_reports_where_bad_bytes_were(tmp_path: Path, tiny_encoder_spec: str) -> None:
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"good line\nbad \xff byte\nanother\n")
    out = run("ingest", str(corpus), "--encoder", tiny_encoder_spec, "--prefect", "off")
    assert "invalid UTF-8 1" in out.output and "invalid UTF-8 at line 2" in out.output and "written 3" in out.output
    skipped = run("ingest", str(corpus), "--memory", "skipped", "--errors", "skip", "--encoder", tiny_encoder_spec,
                  "--prefect", "off")
    assert "written 2" in skipped.output
