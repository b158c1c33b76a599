"""What a decapflow run shows in Prefect: progress lines in the run's logs, a progress artifact that moves, and
artifacts keyed by bank (the UI keeps a history per key).

Keys, for bank ``coco``: ``ingest-coco`` (markdown summary), ``ingest-coco-progress``, ``train-coco`` (table of
the run), ``train-coco-loss`` (the loss curve), ``train-coco-progress``, ``gate-coco`` (the scoreboard, one row
per decision), ``caption-coco`` (first captions) and ``caption-coco-results`` (a link to the results file); for a
store, ``maintenance`` (one row per bank and table maintained).

A run must not fail because the UI's side of it did: an artifact that cannot be written is a warning in the log.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    Artifact,
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from decapflow.decoder.plot import data_url
from decapflow.progress import Pulse

SCOREBOARD_ROWS = 100  # decisions kept in the gate's table (older ones stay in the key's history)
CAPTION_ROWS = 20


def artifact_key(*parts: str) -> str:
    """An artifact key from a kind and a bank name: lowercase letters, digits and dashes (``Coco_2017`` ->
    ``coco-2017``)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def _safely(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the UI's view of a run is never worth the run
        get_run_logger().warning("could not write the %s artifact: %s", what, error)
        return None


def run_pulse(kind: str, bank: str, every_s: float = 30.0) -> Pulse:
    """A :class:`~decapflow.progress.Pulse` whose lines go to the run's log and whose share of work done moves
    the ``KIND-BANK-progress`` artifact."""
    logger = get_run_logger()
    key = artifact_key(kind, bank, "progress")
    progress_id = _safely("progress", create_progress_artifact, 0.0, key=key, description=f"{kind} of bank {bank}")

    def emit(line: str, fraction: float | None) -> None:
        logger.info(line)
        if progress_id is not None and fraction is not None:
            _safely("progress", update_progress_artifact, progress_id, round(100 * fraction, 1))

    return Pulse(emit, every_s=every_s)


def _table(rows: list[tuple[str, Any]]) -> str:
    return "| | |\n|---|---:|\n" + "".join(f"| {name} | {value} |\n" for name, value in rows)


def ingest_summary(report: dict[str, Any]) -> None:
    """``ingest-BANK``: the numbers ``decapflow ingest`` prints, as markdown."""
    c = report["corpus"]
    rate = report["written"] / report["seconds"] if report["seconds"] else 0.0
    rows = [("records read", f"{c.get('read', 0):,}"), ("empty", f"{c.get('empty', 0):,}"),
            ("duplicates in the file", f"{c.get('duplicates', 0):,}"),
            ("already stored", f"{c.get('already_stored', 0):,}"), ("invalid", f"{c.get('invalid', 0):,}"),
            ("invalid UTF-8 lines", f"{c.get('invalid_utf8', 0):,}"),
            ("truncated to the encoder's context", f"{report['truncated']:,}"),
            ("stored meanwhile by another writer", f"{report['concurrent']:,}"),
            ("**written**", f"**{report['written']:,}**"), ("chunks committed", report["chunks"]),
            ("bank rows after", f"{report['rows']:,}"), ("bank version after", report["version"]),
            ("seconds", f"{report['seconds']:.1f} ({rate:,.0f} sentences/s)")]
    where = [f"line {n}" for n in c.get("invalid_lines", [])[:5]]
    markdown = (f"# Ingest of `{report['source']}` into bank `{report['bank']}`\n\nencoder `{report['encoder']}`"
                + (f"; first invalid records: {', '.join(where)}" if where else "") + "\n\n" + _table(rows))
    _safely("ingest", create_markdown_artifact, markdown, key=artifact_key("ingest", report["bank"]),
            description=f"ingest of {report['source']}: {report['written']:,} written, bank v{report['version']}")


def _recipe_text(config: str, recipe: dict[str, Any]) -> str:
    text = (f"{config} · lr {recipe['lr']:g} · batch {recipe['batch_size']} · {recipe['epochs']} epochs · "
            f"warm-up {recipe['warmup_steps']}")
    extras = [f"max {recipe['max_steps']} steps" if recipe.get("max_steps") else "",
              f"noise {recipe['noise_std']:g}" if recipe.get("noise_std") else "",
              f"patience {recipe['patience']}" if recipe.get("patience") is not None else "no early stop"]
    return " · ".join([text, *[e for e in extras if e]])


def training_artifacts(result: dict[str, Any]) -> None:
    """``train-BANK`` (a table of the run) and ``train-BANK-loss`` (the loss curve the trainer drew)."""
    bank, decision = result["bank"], result["decision"]

    def loss(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    table = [{"field": name, "value": value} for name, value in [
        ("decoder", result["decoder"]), ("bank version", result["bank_version"]),
        ("recipe", _recipe_text(str(result["config"]), result["recipe"])), ("device", result["device"]),
        ("steps", f"{result['steps']:,}" + (" (stopped early)" if result["stopped_early"] else "")),
        ("epochs", f"{len(result['history'])} (best: {result['best_epoch']})"),
        ("final train loss", loss(result["train_loss"])), ("final validation loss", loss(result["val_loss"])),
        ("tokens/s", f"{result['tokens_per_s']:,.0f}" if result["tokens_per_s"] else "-"),
        ("training seconds", f"{result['train_seconds']:.1f}"),
        ("gate", "promoted" if result["promoted"] else "rejected"), ("gate score",
         f"{decision['metric']} {decision['challenger_score']:.4f}"), ("run folder", result["run"])]]
    _safely("training", create_table_artifact, table, key=artifact_key("train", bank),
            description=f"decoder {result['decoder']} for bank {bank} (v{result['bank_version']})")
    plot = Path(result["loss_plot"])
    if plot.is_file():
        _safely("loss curve", create_image_artifact, data_url(plot), key=artifact_key("train", bank, "loss"),
                description=f"loss per epoch of decoder {result['decoder']} ({plot})")


def scoreboard_row(decision: dict[str, Any], decided_at: str) -> dict[str, Any]:
    """One gate decision as a scoreboard row."""
    theirs = decision["champion_score"]
    mine = decision["challenger_score"]
    verdict = ("promoted" if decision["promoted"] else "rejected") + ("" if decision["gated"] else " (by hand)")
    return {"decided": decided_at, "challenger": decision["challenger"], "champion": decision["champion"] or "-",
            "metric": decision["metric"], "eval set": decision["eval_set"], "challenger score": round(mine, 4),
            "champion score": "-" if theirs is None else round(theirs, 4),
            "difference": "-" if theirs is None else f"{mine - theirs:+.4f}", "margin": decision["margin"],
            "decision": verdict, "bank version": decision["bank_version"], "reason": decision["reason"]}


def gate_scoreboard(decision: dict[str, Any], decided_at: str) -> list[dict[str, Any]]:
    """``gate-BANK``: every decision so far, newest first (the previous version of the table plus this one)."""
    key = artifact_key("gate", decision["bank"])
    previous = _safely("gate", Artifact.get, key)
    rows = json.loads(previous.data) if previous is not None and isinstance(previous.data, str) else []
    rows = [scoreboard_row(decision, decided_at),
            *[r for r in rows if r.get("challenger") != decision["challenger"]]][:SCOREBOARD_ROWS]
    _safely("gate", create_table_artifact, rows, key=key,
            description=f"challenger vs champion for bank {decision['bank']}, newest first")
    return rows


def caption_artifacts(bank: str, captions: list[Any], results: Path) -> None:
    """``caption-BANK`` (the first captions) and ``caption-BANK-results`` (a link to the whole results file)."""
    table = [{"image": Path(c.image or "").name, "caption": c.caption, "strategy": c.strategy}
             for c in captions[:CAPTION_ROWS]]
    _safely("caption", create_table_artifact, table, key=artifact_key("caption", bank),
            description=f"the first {len(table)} of {len(captions)} captions against bank {bank}")
    _safely("caption results", create_link_artifact, results.resolve().as_uri(),
            link_text=f"{results.name} ({len(captions)} captions)", key=artifact_key("caption", bank, "results"))


def maintenance_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """``maintenance``: one row per bank (then per store table) of a store's maintenance (``maintain_store``'s
    report): versions removed, MB freed, fragments and unindexed rows before -> after, seconds, or the error."""

    def arrow(before: Any, after: Any) -> str:
        return "-" if before is None and after is None else f"{'-' if before is None else before} -> " \
                                                             f"{'-' if after is None else after}"

    rows = []
    for r in [*report["banks"], *report["tables"]]:
        name = r.get("bank") or r["table"]
        if "error" in r:
            rows.append({"bank": name, "versions removed": "-", "MB freed": "-", "fragments": "-",
                         "unindexed rows": "-", "seconds": "-", "result": f"failed: {r['error']}"[:300]})
            continue
        rows.append({"bank": name, "versions removed": r["versions_removed"],
                     "MB freed": round(r["bytes_freed"] / 1e6, 2),
                     "fragments": arrow(r["fragments_before"], r["fragments"]),
                     "unindexed rows": arrow(r.get("unindexed_before"), r.get("unindexed")),
                     "seconds": r["seconds"],
                     "result": ("still: " + "; ".join(r["needs"])) if r.get("needs") else "ok"})
    failed = f", {len(report['failed'])} failed" if report["failed"] else ""
    _safely("maintenance", create_table_artifact, rows, key="maintenance",
            description=f"maintenance of {len(report['banks'])} bank(s) in {report['store']} (retain "
                        f"{report['retain']}): {report['mb_freed']:,.1f} MB freed{failed}")
    return rows
