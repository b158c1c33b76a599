"""Nightly maintenance: every bank of the store compacted, its versions older than the retention removed (tagged
ones kept), its ANN index brought up to date; then the store's own tables (the ``nightly-maintenance`` deployment).

The run is named ``maintain-banks``, logs a line per bank and leaves the ``maintenance`` table artifact
(:func:`flows.report.maintenance_table`). Banks are maintained one after another, each in a task retried like every
store access (maintenance is safe to repeat: each step is its own commit and finds done what was done), except
when the bank is missing or read-only. A bank that still fails is logged and the others go on; the run fails at the
end, naming them."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from decapflow.bank.maintenance import format_retention
from decapflow.bank.memory import Registry
from decapflow.config import store_uri
from decapflow.errors import BankError
from decapflow.lifecycle.maintenance import maintain_bank, maintain_tables, parse_retention, summary_line
from flows.prefect_env import STORE_RETRIES
from flows.report import maintenance_table


@task(name="list-banks", cache_policy=NO_CACHE, **STORE_RETRIES)
def list_banks(store: str | None = None) -> list[str]:
    return Registry(store).names()


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what a store's bad seconds cause, not a bank that is not there or cannot be written (a BankError)."""
    try:
        state.result()
    except BankError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return True


maintain_bank_task = task(maintain_bank, name="maintain-bank", task_run_name="maintain-{name}",
                          cache_policy=NO_CACHE, retry_condition_fn=_worth_retrying, **STORE_RETRIES)
maintain_tables_task = task(maintain_tables, name="maintain-store-tables", cache_policy=NO_CACHE, **STORE_RETRIES)


class MaintenanceFailed(RuntimeError):
    """Some banks (or store tables) could not be maintained; the others were."""


@flow(name="decapflow-maintain", flow_run_name="maintain-banks")
def nightly_maintenance_flow(retain: str | int = "7d", store: str | None = None, banks: list[str] | None = None
                             ) -> dict[str, Any]:
    """Maintain every bank of ``store`` (or ``banks``) keeping versions younger than ``retain`` (``7d``, ``12h``,
    ``0``...; an int only as 0, which ``prefect deployment run -p retain=0`` sends) and tagged ones, then the store's
    own tables. Returns the report the ``maintenance`` artifact shows; fails at the end when a bank failed, after the
    others ran."""
    logger = get_run_logger()
    retain = format_retention(parse_retention(retain))  # a bad retention fails the run before anything is touched
    names = list(banks) if banks else list_banks(store)
    logger.info("maintaining %d bank(s), keeping versions younger than %s and tagged ones", len(names), retain)
    results: list[dict[str, Any]] = []
    for name in names:
        try:
            result = maintain_bank_task(name, retain, store)
        except Exception as error:  # noqa: BLE001 - one bank's failure must not stop the others
            result = {"bank": name, "error": f"{type(error).__name__}: {error}"}
            logger.error(summary_line(result))
        else:
            logger.info(summary_line(result) + "".join(f"; still: {n}" for n in result["needs"]))
        results.append(result)
    try:
        tables = maintain_tables_task(store, retain)
    except Exception as error:  # noqa: BLE001
        tables = [{"table": "store tables", "error": f"{type(error).__name__}: {error}"}]
    for result in tables:
        (logger.error if "error" in result else logger.info)(summary_line(result))
    failed = [r["bank"] for r in results if "error" in r] + [t["table"] for t in tables if "error" in t]
    freed = sum(r.get("bytes_freed", 0) for r in [*results, *tables])
    report = {"store": store_uri(store), "retain": retain, "banks": results, "tables": tables, "failed": failed,
              "mb_freed": round(freed / 1e6, 3)}
    maintenance_table(report)
    if failed:
        raise MaintenanceFailed(f"maintenance failed for {', '.join(failed)} (the others were maintained; see the "
                                f"'maintenance' artifact and this run's log)")
    logger.info("done: %d bank(s) maintained, %.1f MB freed", len(results), report["mb_freed"])
    return report
