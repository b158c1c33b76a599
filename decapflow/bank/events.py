"""Prefect events for what changes in a store, so deployments can react (``prefect.yaml``'s triggers).

    decapflow.bank.updated      resource decapflow.bank.<bank>       rows added, new version, rows
    decapflow.bank.removed      resource decapflow.bank.<bank>       rows removed, new version, rows, stale decoders
    decapflow.bank.restored     resource decapflow.bank.<bank>       version restored, rows back and gone, new version
    decapflow.decoder.promoted  resource decapflow.decoder.<id>      the gate's decision (related: the bank)
    decapflow.decoder.rejected  resource decapflow.decoder.<id>      the gate's decision (related: the bank)

Events go to the Prefect server named by ``PREFECT_API_URL`` (the environment or the active Prefect profile); with
none configured, or one that does not answer, :func:`emit` does nothing, so the library and the CLI run the same
with or without Prefect.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def api_answers(api: str, timeout: float = 2.0) -> bool:
    """Whether the Prefect API at ``api`` answers its health check (a refused connection answers at once)."""
    try:
        with urllib.request.urlopen(api.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
        return True
    except OSError:
        return False


def prefect_api() -> str | None:
    """The Prefect API events would go to, or None."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    prefect_home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    if not Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home / "profiles.toml").is_file():
        return None  # no profile can name a server: skip importing Prefect (~1.5 s)
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def emit(event: str, resource: str, name: str, payload: dict[str, Any],
         related: list[tuple[str, str, str]] = ()) -> bool:
    """Send ``event`` about ``resource`` (id ``decapflow.<kind>.<name>``) and wait until it is delivered (an
    ingest or a training run is a short process). ``related``: (id, name, role) triples. Returns whether an event
    was sent; a failure to send is logged, never raised: the data is already written."""
    try:
        api = prefect_api()
        if not api or not api_answers(api):  # never wait on, or even import Prefect for, a server that is down
            return False
        from prefect.context import FlowRunContext
        from prefect.events import emit_event
        from prefect.events.worker import EventsWorker

        sent = emit_event(
            event=event,
            resource={"prefect.resource.id": resource, "prefect.resource.name": name},
            related=[{"prefect.resource.id": rid, "prefect.resource.name": rname, "prefect.resource.role": role}
                     for rid, rname, role in related] or None,
            payload=payload,
        )
        if FlowRunContext.get() is None:  # a flow run delivers its events when it ends; a plain process must wait
            EventsWorker.drain_all(timeout=10, at_exit=False)
        return sent is not None
    except Exception as exc:  # noqa: BLE001 - an event lost must not fail the write it reports
        log.warning("could not emit %s for %s: %s", event, resource, exc)
        return False


def bank_updated(bank: str, rows_added: int, version: int, rows: int, source: str = "") -> bool:
    return emit("decapflow.bank.updated", f"decapflow.bank.{bank}", bank,
                {"bank": bank, "rows_added": rows_added, "version": version, "rows": rows, "source": source})


def bank_rows_left(event: str, bank: str, payload: dict[str, Any]) -> bool:
    """``decapflow.bank.removed`` or ``decapflow.bank.restored``: rows left (or came back), so the bank's decoders
    may have learnt sentences it no longer holds; the retrain deployment follows these too."""
    if event not in ("removed", "restored"):
        raise ValueError(f"unknown bank event {event!r}")
    return emit(f"decapflow.bank.{event}", f"decapflow.bank.{bank}", bank, {"bank": bank, **payload})


def decoder_decided(decision: dict[str, Any]) -> bool:
    bank, decoder_id = decision["bank"], decision["challenger"]
    kind = "promoted" if decision["promoted"] else "rejected"
    return emit(f"decapflow.decoder.{kind}", f"decapflow.decoder.{bank}.{decoder_id}", decoder_id, decision,
                related=[(f"decapflow.bank.{bank}", bank, "bank")])
