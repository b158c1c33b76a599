"""What a team sees of a run in Prefect, read back through the API of a real (temporary, local) Prefect server:
run names that name the bank, progress lines with the loss in the run's logs, and artifacts keyed by bank."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from uuid import UUID

import pytest

TINY = {"epochs": 3, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "val_fraction": 0.0, "patience": None}


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def flow_run_of(run_name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with client() as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
    assert runs, f"no flow run named {run_name!r}"
    return max(runs, key=lambda r: r.created)  # the newest


def artifacts_of(flow_run_id: UUID) -> dict[str, object]:
    """The keyed artifacts a run left, by key (the newest per key)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client() as c:
        found = c.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in sorted(found, key=lambda a: a.created) if a.key}


def logs_of(flow_run_id: UUID, at_least: int = 1, timeout: float = 20) -> list[str]:
    """The run's log messages (they reach the server in batches: wait for ``at_least``)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        with client() as c:
            logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        if len(logs) >= at_least or time.monotonic() > deadline:
            return [log.message for log in sorted(logs, key=lambda log: log.timestamp)]
        time.sleep(0.3)


def test_artifact_keys_are_lowercase_letters_digits_and_dashes() -> None:
    from flows.report import artifact_key

    assert artifact_key("train", "Coco_2017.v2") == "train-coco-2017-v2"
    assert artifact_key("gate", "--a__b--") == "gate-a-b"


def test_ingest_flow_is_named_after_its_bank_and_leaves_a_summary(tmp_path: Path, decapflow_home: Path,
                                                                  tiny_encoder_spec: str) -> None:
    from flows.ingest import ingest_flow

    corpus = tmp_path / "corpus.txt"
    lines = [f"a red circle number {i}" for i in range(30)]
    corpus.write_text("\n".join(lines + lines[:5] + ["", "a blue square"]) + "\n")
    report = ingest_flow(str(corpus), memory="Shapes_1", encoder=tiny_encoder_spec, chunk_size=10)
    assert report["written"] == 31 and report["chunks"] == 4
    run = flow_run_of("ingest-Shapes_1")
    found = artifacts_of(run.id)
    assert set(found) == {"ingest-shapes-1", "ingest-shapes-1-progress"}
    summary = found["ingest-shapes-1"].data
    assert "| **written** | **31** |" in summary and "| duplicates in the file | 5 |" in summary
    assert "| bank version after | " in summary and "| records read | 37 |" in summary
    assert found["ingest-shapes-1-progress"].data == 100.0
    chunks = [m for m in logs_of(run.id, at_least=5) if " committed: " in m]
    assert len(chunks) == 4 and re.search(r"chunk 4 committed: 37 records read, 31 sentences written", chunks[-1])


def test_training_flow_logs_progress_with_the_loss_and_leaves_its_table_curve_and_scoreboard(
        own_home: Path) -> None:
    from flows.train import train_flow

    first = train_flow("shapes", config="tiny", recipe=TINY, log_every_s=0.0)
    run = flow_run_of("train-shapes")
    lines = logs_of(run.id, at_least=10)
    steps = [m for m in lines if re.match(r"step \d+/6 \(\d+%\) · epoch \d/3 · loss \d+\.\d{4} · [\d,]+ tokens/s", m)]
    assert len(steps) >= 3, lines
    assert len([m for m in lines if m.startswith("validation after epoch")]) == 3
    assert any(m.startswith("slots acquired after") for m in lines)
    with client() as c:
        (task_run,) = [t for t in c.read_task_runs() if t.flow_run_id == run.id and t.name == "train-shapes"]
    assert task_run.run_count == 1

    found = artifacts_of(run.id)
    assert {"train-shapes", "train-shapes-loss", "train-shapes-progress", "gate-shapes"} <= set(found)
    table = {row["field"]: row["value"] for row in json.loads(found["train-shapes"].data)}
    assert table["decoder"] == first["decoder"] and table["steps"] == "6" and table["device"] == "cpu"
    assert table["recipe"].startswith("tiny · lr 0.01 · batch 4 · 3 epochs")
    assert float(table["final train loss"]) == pytest.approx(first["train_loss"], abs=1e-4)
    assert found["train-shapes-loss"].type == "image" and found["train-shapes-loss"].data.startswith(
        "data:image/png;base64,")
    assert found["train-shapes-progress"].data == 100.0
    (row,) = json.loads(found["gate-shapes"].data)
    assert row["challenger"] == first["decoder"] and row["decision"] == "promoted (by hand)"

    # A second run, gated: its decision is the new top row of the bank's scoreboard, above the first.
    second = train_flow("shapes", config="tiny", recipe={**TINY, "epochs": 1}, gate=True, log_every_s=30.0)
    board = json.loads(artifacts_of(flow_run_of("train-shapes").id)["gate-shapes"].data)
    assert [r["challenger"] for r in board] == [second["decoder"], first["decoder"]]
    top = board[0]
    assert top["champion"] == first["decoder"] and top["metric"] == "text.cider"
    assert top["decision"] == ("promoted" if second["promoted"] else "rejected")
    assert float(top["difference"]) == pytest.approx(top["challenger score"] - top["champion score"], abs=1e-3)


def test_a_diverged_training_fails_once_and_is_not_retried(own_home: Path) -> None:
    from decapflow.errors import TrainingDiverged
    from flows.train import train_flow

    with pytest.raises(TrainingDiverged, match="loss is nan|loss is inf|train loss (nan|inf)"):
        train_flow("shapes", config="tiny", recipe={**TINY, "lr": 1e12, "grad_clip": 0.0}, log_every_s=0.0)
    run = flow_run_of("train-shapes")
    assert run.state.is_failed()
    with client() as c:
        (task_run,) = [t for t in c.read_task_runs() if t.flow_run_id == run.id and t.name == "train-shapes"]
    assert task_run.run_count == 1 and task_run.state.is_failed()


def test_caption_flow_leaves_its_first_captions_and_a_link_to_the_results(home: Path, images: Path,
                                                                          tmp_path: Path) -> None:
    from flows.caption import caption_flow

    manifest = caption_flow(str(images), "shapes", str(tmp_path / "out"))
    assert manifest["captioned"] == 3
    found = artifacts_of(flow_run_of("caption-shapes-imgs").id)
    assert set(found) == {"caption-shapes", "caption-shapes-results"}
    rows = json.loads(found["caption-shapes"].data)
    assert [r["image"] for r in rows] == ["img_000007.png", "img_000008.png", "img_000009.png"]
    assert all(r["caption"] and r["strategy"] == "pd" for r in rows)
    assert (tmp_path / "out" / "captions.jsonl").resolve().as_uri() in found["caption-shapes-results"].data


def test_training_limits_are_created_once_and_then_left_as_an_operator_set_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from flows.slots import ensure_limit, max_trainings

    monkeypatch.setenv("DECAPFLOW_MAX_TRAININGS", "3")
    assert max_trainings() == 3
    monkeypatch.setenv("DECAPFLOW_MAX_TRAININGS", "0")
    with pytest.raises(ValueError, match="DECAPFLOW_MAX_TRAININGS"):
        max_trainings()
    assert ensure_limit("trainings-test-host", 2) == 2
    with client() as c:
        c.update_global_concurrency_limit("trainings-test-host", GlobalConcurrencyLimitUpdate(limit=5))
    assert ensure_limit("trainings-test-host", 2) == 5
