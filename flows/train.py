"""Training flows: train a bank's decoder; retrain a bank when it has grown, gated (the event-triggered
deployment); retrain every bank that changed (the nightly deployment)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from decapflow.bank.memory import Registry
from decapflow.lifecycle.training import retrain_due, train_bank

train_task = task(train_bank, name="train-decoder", cache_policy=NO_CACHE)


@flow(name="decapflow-train")
def train_flow(bank: str, config: str = "decap-small", recipe: dict[str, Any] | None = None,
               store: str | None = None, resume: bool = False, progress: bool = False, gate: bool = False,
               metric: str = "auto", margin: float = 0.0) -> dict[str, Any]:
    """Train a decoder for one memory bank; make it current (``gate``: only when it beats the current one)."""
    return train_task(bank, config, recipe or {}, store, resume, progress, gate=gate, metric=metric, margin=margin)


@flow(name="decapflow-retrain-bank")
def retrain_bank_flow(bank: str, config: str = "decap-small", recipe: dict[str, Any] | None = None,
                      store: str | None = None, metric: str = "auto", margin: float = 0.0, min_new_rows: int = 1,
                      min_growth: float | None = None) -> dict[str, Any]:
    """When ``bank`` grew enough since its current decoder (``min_new_rows`` rows or a ``min_growth`` share),
    train a challenger on the bank version of this moment (pinned: ingests running meanwhile do not leak in)
    and promote it only if it beats the current decoder by ``margin`` on ``metric``."""
    logger = get_run_logger()
    version = Registry(store).open(bank).version
    due, reason = retrain_due(bank, store, min_new_rows, min_growth)
    logger.info("bank %s at version %s: %s", bank, version, reason)
    if not due:
        return {"bank": bank, "bank_version": version, "trained": False, "reason": reason}
    result = train_task(bank, config, recipe or {}, store, False, False, gate=True, metric=metric, margin=margin,
                        version=version)
    logger.info(result["summary"])
    return {**result, "trained": True, "reason": reason}


@flow(name="decapflow-retrain")
def retrain_flow(banks: list[str] | None = None, config: str = "decap-small", recipe: dict[str, Any] | None = None,
                 store: str | None = None, metric: str = "auto", margin: float = 0.0,
                 min_new_rows: int = 1) -> list[dict[str, Any]]:
    """Scheduled retraining: a gated challenger for every bank (or ``banks``) that changed since its current
    decoder was trained; banks without a decoder get one. Returns the banks trained."""
    results = [retrain_bank_flow(name, config, recipe, store, metric, margin, min_new_rows)
               for name in banks or Registry(store).names()]
    return [r for r in results if r["trained"]]
