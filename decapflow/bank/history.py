"""A bank's history: every change recorded with what made it, in the store's ``_history`` table.

One row per commit a change makes (an ingest writes one per chunk), all rows of one change sharing its ``op_id``::

    bank | time | op | op_id | version | rows_added | rows_removed | rows | source | content_hash | user | host |
    flow_run | details (JSON)

``op`` is one of :data:`OPS`. ``version`` is the bank version the commit made (for a tag: the version tagged),
``rows`` the bank's rows after it. ``source`` and ``content_hash`` name the file behind an ingest, import or
removal (its SHA-256), ``user``/``host`` who ran it, ``flow_run`` the Prefect flow run (``name (id)``) when the
change ran inside one. :func:`history` groups the rows into one entry per change, newest last.

The row is written right after the commit it describes (LanceDB has no transaction spanning two tables); a process
killed in between leaves a version without a row, which :func:`history` readers can tell from the bank's versions.
Rows never hold a bank sentence: a purge must be able to erase every one (a removal by ``--match`` records its
pattern unless it purges).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from decapflow.bank.store import Store, get_store

__all__ = ["Change", "OPS", "drop_history", "file_sha256", "history", "record"]

log = logging.getLogger(__name__)

OPS = ("create", "ingest", "import", "remove", "purge", "restore", "clone", "tag", "maintain", "delete")
SCHEMA = pa.schema([
    ("bank", pa.string()), ("time", pa.string()), ("op", pa.string()), ("op_id", pa.string()),
    ("version", pa.int64()), ("rows_added", pa.int64()), ("rows_removed", pa.int64()), ("rows", pa.int64()),
    ("source", pa.string()), ("content_hash", pa.string()), ("user", pa.string()), ("host", pa.string()),
    ("flow_run", pa.string()), ("details", pa.string()),
])
TABLE = "_history"


def utc_now() -> str:
    """UTC time to the microsecond (rows sort by it)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (``sha256:<hex>``), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return str(os.getuid()) if hasattr(os, "getuid") else "?"


def _flow_run() -> str:
    """``name (id)`` of the Prefect flow run this process is running, else ''. Never imports Prefect itself."""
    if "prefect.context" not in sys.modules:
        return ""
    try:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        run = context.flow_run if context is not None else None
        return f"{run.name} ({run.id})" if run is not None else ""
    except Exception:  # noqa: BLE001 - a label only
        return ""


@dataclass
class Change:
    """What is changing a bank: the operation, the file behind it, and details (plain JSON data). One object per
    change: each commit it makes is recorded under its ``op_id``."""

    op: str
    source: str = ""
    content_hash: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    op_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown change {self.op!r}; one of {OPS}")


def record(store: Store | str | None, bank: str, change: Change, *, version: int, rows: int, added: int = 0,
           removed: int = 0, details: dict[str, Any] | None = None) -> bool:
    """Append one row for a commit ``change`` made (``details`` adds to the change's own). Returns whether it was
    written: the commit already happened, so a store that fails three times is logged, not raised."""
    row = {"bank": bank, "time": utc_now(), "op": change.op, "op_id": change.op_id, "version": int(version),
           "rows_added": int(added), "rows_removed": int(removed), "rows": int(rows), "source": change.source,
           "content_hash": change.content_hash, "user": _user(), "host": socket.gethostname(),
           "flow_run": _flow_run(), "details": json.dumps({**change.details, **(details or {})}, default=str)}
    store = get_store(store)
    for attempt in range(3):
        try:
            store.table(TABLE, SCHEMA).add(pa.Table.from_pylist([row], schema=SCHEMA))
            return True
        except Exception as error:  # noqa: BLE001 - appends do not conflict; this is the store failing
            if attempt == 2:
                log.warning("bank %s: could not record %s of version %s in the history: %s", bank, change.op,
                            version, error)
            time.sleep(0.2 * (attempt + 1))
    return False


def rows(store: Store | str | None, bank: str) -> list[dict[str, Any]]:
    """The raw history rows of ``bank``, oldest first (details parsed)."""
    table = get_store(store).table(TABLE, SCHEMA)
    quoted = bank.replace("'", "''")
    found = table.search().where(f"bank = '{quoted}'").limit(None).to_list()
    for row in found:
        row["details"] = json.loads(row["details"] or "{}")
    return sorted(found, key=lambda r: r["time"])


def history(store: Store | str | None, bank: str, current: bool = False) -> list[dict[str, Any]]:
    """One entry per change to ``bank``, oldest first: op, when it started and ended, the versions it made (first and
    last), rows added and removed, rows after, commits, source, content hash, user, host, flow run, details (the
    last commit's). A name reused after ``memory rm`` keeps the earlier bank's entries before its ``create``;
    ``current`` leaves them out (entries from its ``create``, or its ``clone``, on)."""
    entries: dict[str, dict[str, Any]] = {}
    for row in rows(store, bank):
        entry = entries.get(row["op_id"])
        if entry is None:
            entries[row["op_id"]] = {
                "op": row["op"], "op_id": row["op_id"], "time": row["time"], "ended": row["time"],
                "version_from": row["version"], "version": row["version"], "rows_added": row["rows_added"],
                "rows_removed": row["rows_removed"], "rows": row["rows"], "commits": 1, "source": row["source"],
                "content_hash": row["content_hash"], "user": row["user"], "host": row["host"],
                "flow_run": row["flow_run"], "details": row["details"]}
            continue
        entry.update(ended=row["time"], version=row["version"], rows=row["rows"], commits=entry["commits"] + 1,
                     rows_added=entry["rows_added"] + row["rows_added"],
                     rows_removed=entry["rows_removed"] + row["rows_removed"], details={**entry["details"],
                                                                                      **row["details"]})
    out = list(entries.values())
    if current:
        creates = [i for i, e in enumerate(out) if e["op"] in ("create", "clone")]  # where this bank began
        out = out[creates[-1]:] if creates else out
    return out


def drop_history(store: Store | str | None, bank: str) -> int:
    """Forget ``bank``'s history rows (tests and a store's own clean-up; deleting a bank records ``delete``)."""
    table = get_store(store).table(TABLE, SCHEMA)
    quoted = bank.replace("'", "''")
    count = table.count_rows(f"bank = '{quoted}'")
    table.delete(f"bank = '{quoted}'")
    return count
