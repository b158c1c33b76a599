"""Branching a bank (``decapflow memory clone``): a new bank that shares the source's files (LanceDB's shallow
clone: no row is copied, so a million-row bank clones in well under a second), to try a corpus change beside the
bank in production.

The clone starts where the source stood at the version cloned: it gets a copy of the source's current decoder (so
it captions at once; its own trainings and promotions never touch the source's), its evaluation sets (so its
challengers are gated on the same sentences and images) and its mean image embedding. From then on the two evolve
apart. The source keeps a ``_clone-NEW`` tag on the shared version, so maintenance never removes files the clone
reads; a source with clones cannot be deleted, and deleting the clone drops the tag.
"""

from __future__ import annotations

import time
from typing import Any

from decapflow.bank import history
from decapflow.bank.memory import Registry
from decapflow.bank.store import Store, get_store
from decapflow.bank.versions import clone_bank
from decapflow.caption.modality import load_image_mean, save_image_mean
from decapflow.decoder.registry import decoders
from decapflow.errors import BankError
from decapflow.lifecycle.evalsets import copy_eval_sets

__all__ = ["clone"]


def clone(source_ref: str, new: str, *, version: int | None = None, tag: str | None = None,
          store: Store | str | None = None) -> dict[str, Any]:
    """Clone bank ``source_ref`` (``NAME``, ``NAME@TAG`` or ``NAME@vN``; or ``version``/``tag`` given apart) as
    bank ``new`` with a copy of its current decoder, its evaluation sets and its image mean."""
    start = time.perf_counter()
    if version is not None and tag is not None:
        raise BankError("give --version or --tag, not both")
    if "@" in source_ref and (version is not None or tag is not None):
        raise BankError(f"{source_ref!r} names a version already: drop --version/--tag")
    ref = source_ref if version is None and tag is None else (
        f"{source_ref}@v{version}" if version is not None else f"{source_ref}@{tag}")
    store = get_store(store)
    registry = Registry(store)
    source = registry.open(ref)
    copy = clone_bank(registry, source, new, history.Change("clone", details={
        "source": source.name, "source_version": source.version, "source_ref": ref}))
    reg = decoders(store)
    current = reg.current_id(source.name)
    if current is not None:
        reg.add(new, reg.local(source.name, current), current, status="promoted")
        reg.set_current(new, current, reason=f"cloned from {ref} (v{source.version})")
    sets = copy_eval_sets(source.name, new, store)
    mean = load_image_mean(source.name, source.encoder, store)
    if mean is not None:
        save_image_mean(new, mean, store)
    return {"bank": new, "source": source.name, "source_version": source.version, "version": copy.version,
            "rows": len(copy), "decoder": current, "eval_sets": sets, "image_mean": mean is not None,
            "seconds": round(time.perf_counter() - start, 3)}
