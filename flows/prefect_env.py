"""How decapflow runs Prefect: state under the decapflow home, quiet logs, and no waiting on a dead server.

Modes of ``--prefect``:
- ``auto`` (default): run as a Prefect flow when ``PREFECT_API_URL`` names a server that answers (~1 s of
  overhead); otherwise run the same library stages in-process and say so. A command never waits on a server
  that is not running.
- ``on``: always a Prefect flow; with no server configured Prefect starts a temporary local one (measured ~8 s
  on a quiet 2-core machine, more when it is busy).
- ``off``: never Prefect.
"""

from __future__ import annotations

import os

from decapflow.bank.events import api_answers
from decapflow.config import home

EPHEMERAL_OFF = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS", "REPOSSESSOR",
                 "TRIGGERS", "DB_VACUUM", "CLEANUP_RECONCILER", "EVENT_LOGGER")
MODES = ("auto", "on", "off")
# Tasks that read or write the store retry with these delays (an object store has bad seconds, not bad hours).
STORE_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}


class PrefectUnavailable(RuntimeError):
    """PREFECT_API_URL names a server that does not answer, and Prefect was required."""


def configure(mode: str = "auto") -> tuple[str | None, str]:
    """Prepare Prefect's environment (call before importing prefect) and decide where flows run.

    Returns (the Prefect API the flow will use, or None to run the library in-process; a one-line reason)."""
    if mode not in MODES:
        raise ValueError(f"--prefect must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return None, "--prefect off"
    os.environ.setdefault("PREFECT_HOME", str(home() / "prefect"))
    # Run logs (progress lines, summaries) go to the server at INFO; the terminal shows only warnings from
    # Prefect, next to decapflow's own output.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    api = os.environ.get("PREFECT_API_URL")
    if api:
        if api_answers(api):
            return api, f"Prefect server {api}"
        if mode == "on":
            raise PrefectUnavailable(
                f"the Prefect API at {api} does not answer; start it with `prefect server start`, "
                f"or unset PREFECT_API_URL to use a temporary local server"
            )
        return None, f"the Prefect server at {api} does not answer"
    if mode == "auto":
        return None, "no Prefect server configured (PREFECT_API_URL)"
    # A temporary server lives for one command: it needs run history, not schedulers or telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives it 20 s to start; a busy 2-core machine was measured taking 25-30 s (most of it imports).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    for service in EPHEMERAL_OFF:
        os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "false")
    return "temporary", "a temporary local Prefect server"
