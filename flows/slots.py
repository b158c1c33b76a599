"""Who trains when, through Prefect's global concurrency limits: one training per bank at a time (on any worker),
and at most a few trainings per machine.

- ``train-BANK`` (limit 1): two trainings of one bank never overlap; trainings of different banks run side by side.
- ``trainings-HOST`` (limit ``$DECAPFLOW_MAX_TRAININGS``, else the CPUs this process may use): each training on a
  machine keeps at least one core of its fair CPU share (:mod:`decapflow.cpu`).

Both limits are created the first time they are needed; an operator changes them with
``prefect gcl update NAME --limit N`` (or in the UI's Concurrency page), and decapflow leaves them as set.
A run holds both slots while it trains (acquired together, so a run waiting for its bank holds no machine slot),
under a lease that Prefect renews: a worker that dies frees its slots when the lease runs out.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_client, get_run_logger
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from decapflow.cpu import usable_cpus
from flows.report import artifact_key


def max_trainings() -> int:
    """Trainings one machine runs at once: ``$DECAPFLOW_MAX_TRAININGS``, else the CPUs this process may use."""
    value = os.environ.get("DECAPFLOW_MAX_TRAININGS")
    if value is None:
        return usable_cpus()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"DECAPFLOW_MAX_TRAININGS must be a whole number >= 1, not {value!r}")
    return int(value)


def ensure_limit(name: str, limit: int) -> int:
    """The limit ``name`` as it is on the server, created with ``limit`` slots when missing."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:  # another run created it meanwhile
            return client.read_global_concurrency_limit_by_name(name).limit
        return limit


def training_limits(bank: str) -> tuple[str, str]:
    return artifact_key("train", bank), artifact_key("trainings", socket.gethostname())


@contextmanager
def training_slot(bank: str) -> Iterator[float]:
    """Hold bank ``bank``'s training slot and one of this machine's; yields the seconds spent waiting."""
    logger = get_run_logger()
    per_bank, per_machine = training_limits(bank)
    ensure_limit(per_bank, 1)
    machine = ensure_limit(per_machine, max_trainings())
    start = time.monotonic()
    logger.info("waiting for concurrency slots %r (1 training of this bank) and %r (%d trainings on this machine)",
                per_bank, per_machine, machine)
    with concurrency([per_bank, per_machine], occupy=1, strict=True):
        waited = time.monotonic() - start
        logger.info("slots acquired after %.1f s", waited)
        yield waited
