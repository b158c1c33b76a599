"""The training flow: train a bank's decoder from its stored vectors and register it; and scheduled retraining."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from decapflow.decoder.train import train_bank
from decapflow.memory import Registry

train_task = task(train_bank, name="train-decoder", cache_policy=NO_CACHE)


@flow(name="decapflow-train")
def train_flow(bank: str, config: str = "decap-small", recipe: dict[str, Any] | None = None,
               store: str | None = None, resume: bool = False, progress: bool = False) -> dict[str, Any]:
    """Train a decoder for one memory bank and make it the bank's current decoder."""
    return train_task(bank, config, recipe or {}, store, resume, progress)


@flow(name="decapflow-retrain")
def retrain_flow(banks: list[str] | None = None, config: str = "decap-small", recipe: dict[str, Any] | None = None,
                 store: str | None = None) -> list[dict[str, Any]]:
    """Scheduled retraining: train a new decoder for every bank (or ``banks``) whose contents changed since its
    current decoder was trained (the bank version differs). Banks without a decoder get one."""
    from decapflow.decoder.checkpoint import current_meta

    registry = Registry(store)
    results = []
    for name in banks or registry.names():
        current = current_meta(name)
        if current and current.get("bank_version") == registry.open(name).version:
            continue
        results.append(train_task(name, config, recipe or {}, store, False, False))
    return results
