"""The training flow: train a bank's decoder from its stored vectors and register it; and scheduled retraining."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from decapflow.decoder.train import TrainRecipe, train_from_bank
from decapflow.memory import Registry


@task(name="train-decoder", cache_policy=NO_CACHE)
def train_task(bank: str, config: str, recipe: dict[str, Any], store: str | None, resume: bool,
               progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    decoder_id, result = train_from_bank(bank, config=config, recipe=TrainRecipe.from_dict(recipe), store=store,
                                         resume=resume, progress=progress)
    return {"bank": bank, "decoder": decoder_id, "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss, "steps": result.steps, "stopped_early": result.stopped_early,
            "history": result.history, "seconds": time.perf_counter() - start}


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
    from decapflow.decoder.checkpoint import list_decoders

    registry = Registry(store)
    results = []
    for name in banks or registry.names():
        current = [d for d in list_decoders(name) if d.get("current")]
        if current and current[0].get("bank_version") == registry.open(name).version:
            continue
        results.append(train_task(name, config, recipe or {}, store, False, False))
    return results
