"""Training flows: train a bank's decoder; retrain a bank when it has grown, gated (the event-triggered
deployment); retrain every bank that changed (the nightly deployment).

Runs are named after their bank (``train-coco``, ``retrain-coco-v12``), log their progress (step, loss, tokens/s,
ETA, each validation) and leave the artifacts of :mod:`flows.report`. A training holds its bank's slot and one of
its machine's (:mod:`flows.slots`): banks retrain side by side, one bank never twice at once. Reading the bank
is retried; the training is not (a diverged one would diverge again, and it is the costly step)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from decapflow.bank.memory import Registry
from decapflow.bank.refs import BankRef
from decapflow.decoder.registry import current_meta
from decapflow.lifecycle.training import retrain_due, train_bank
from flows.prefect_env import STORE_RETRIES
from flows.report import gate_scoreboard, run_pulse, training_artifacts
from flows.slots import training_slot


@task(name="bank-version", cache_policy=NO_CACHE, **STORE_RETRIES)
def bank_version(bank: str, store: str | None = None) -> int:
    return Registry(store).open(bank).version


retrain_due_task = task(retrain_due, name="retrain-due", cache_policy=NO_CACHE, **STORE_RETRIES)


def _rename(name: str) -> None:
    """Rename this flow run (once its bank version is pinned)."""
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name)


train_task = task(train_bank, name="train-decoder", task_run_name="train-{bank}", cache_policy=NO_CACHE)


def _train(bank: str, config: str, recipe: dict[str, Any] | None, store: str | None, *, resume: bool = False,
           progress: bool = False, gate: bool, metric: str, margin: float, version: int | None,
           log_every_s: float, due: Callable[[], tuple[bool, str]] | None = None,
           fused: bool | dict[str, Any] | None = None) -> dict[str, Any]:
    """Under the bank's and the machine's slots: check ``due()`` (when given), train with progress in the log;
    then leave the run's artifacts. ``bank`` may pin a version (``NAME@TAG``, ``NAME@vN``); slots and artifacts
    belong to the bank's name. ``fused`` None: the kind of the bank's current decoder (retrieval-fused or not)."""
    logger = get_run_logger()
    name = BankRef.parse(bank).name
    with training_slot(name) as waited:
        reason = None
        if due is not None:
            trained, reason = due()
            logger.info("bank %s at version %s: %s", bank, version, reason)
            if not trained:
                return {"bank": bank, "bank_version": version, "trained": False, "reason": reason}
        pulse = run_pulse("train", name, log_every_s)
        if fused is None:
            fused = (current_meta(name, store) or {}).get("fused") or False
        result = train_task(bank, config, recipe or {}, store, resume, progress, gate=gate, metric=metric,
                            margin=margin, version=version, pulse=pulse, fused=fused)
    pulse.say(result["summary"], 1.0)  # done, stopped early or not
    training_artifacts(result)
    gate_scoreboard(result["decision"], time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()))
    return {**result, "trained": True, "reason": reason, "slot_wait_seconds": round(waited, 2)}


@flow(name="decapflow-train", flow_run_name="train-{bank}")
def train_flow(bank: str, config: str = "decap-small", recipe: dict[str, Any] | None = None,
               store: str | None = None, resume: bool = False, progress: bool = False, gate: bool = False,
               metric: str = "auto", margin: float = 0.0, log_every_s: float = 30.0,
               fused: bool | dict[str, Any] | None = False) -> dict[str, Any]:
    """Train a decoder for one memory bank; make it current (``gate``: only when it beats the current one).
    ``fused``: a retrieval-fused decoder (True, or ``{"neighbors": k, "fusion": ...}``; None: like the current).
    ``bank``: ``NAME`` (its newest version, pinned for the run), ``NAME@TAG`` or ``NAME@vN`` (that version; the
    decoder records it). Progress goes to the run's log every ``log_every_s`` seconds and after each validation."""
    return _train(bank, config, recipe, store, resume=resume, progress=progress, gate=gate, metric=metric,
                  margin=margin, version=None, log_every_s=log_every_s, fused=fused)


@flow(name="decapflow-retrain-bank", flow_run_name="retrain-{bank}")
def retrain_bank_flow(bank: str, config: str = "decap-small", recipe: dict[str, Any] | None = None,
                      store: str | None = None, metric: str = "auto", margin: float = 0.0, min_new_rows: int = 1,
                      min_growth: float | None = None, log_every_s: float = 30.0,
                      fused: bool | dict[str, Any] | None = None) -> dict[str, Any]:
    """When ``bank`` grew enough since its last decoder (``min_new_rows`` rows or a ``min_growth`` share), train
    a challenger on the bank version of this moment (pinned: ingests running meanwhile do not leak in; the run is
    renamed ``retrain-BANK-vVERSION``) and promote it only if it beats the current decoder by ``margin`` on
    ``metric``. Whether it is due is decided once the bank's slot is held, so a second retrain triggered for
    the same rows finds them trained and skips. The challenger is of the current decoder's kind (retrieval-fused
    or not) unless ``fused`` says."""
    version = bank_version(bank, store)
    _rename(f"retrain-{bank}-v{version}")
    return _train(bank, config, recipe, store, gate=True, metric=metric, margin=margin, version=version,
                  log_every_s=log_every_s, due=lambda: retrain_due_task(bank, store, min_new_rows, min_growth),
                  fused=fused)


@flow(name="decapflow-retrain", flow_run_name="retrain-changed-banks")
def retrain_flow(banks: list[str] | None = None, config: str = "decap-small", recipe: dict[str, Any] | None = None,
                 store: str | None = None, metric: str = "auto", margin: float = 0.0,
                 min_new_rows: int = 1, fused: bool | dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Scheduled retraining: a gated challenger for every bank (or ``banks``) that changed since its current
    decoder was trained; banks without a decoder get one. Each bank is a ``retrain-BANK-vVERSION`` subflow, one
    after another. Returns the banks trained."""
    results = [retrain_bank_flow(name, config, recipe, store, metric, margin, min_new_rows, fused=fused)
               for name in banks or Registry(store).names()]
    return [r for r in results if r["trained"]]
