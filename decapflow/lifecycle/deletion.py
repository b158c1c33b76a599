"""Deleting a bank as a whole: its rows (all versions), its decoders, its evaluation sets and its mean image
embedding, so that a bank created later under the same name starts clean.

This sits in the lifecycle layer because it is the lowest layer that knows all four: the rows belong to the bank
layer, decoders to the decoder layer, the image mean to captioning and the evaluation sets to the gate.
"""

from __future__ import annotations

from decapflow.bank import history
from decapflow.bank.memory import Registry
from decapflow.bank.refs import clone_pin, writable
from decapflow.bank.store import Store, get_store
from decapflow.bank.versions import clones_of, delete_tag, source_of
from decapflow.caption.modality import drop_image_mean
from decapflow.decoder.registry import decoders
from decapflow.errors import BankError
from decapflow.lifecycle.gate import drop_eval_sets

__all__ = ["delete_bank"]


def delete_bank(name: str, store: Store | str | None = None) -> dict[str, int]:
    """Delete bank ``name`` and everything that belongs to it. Returns how many of each went: ``rows``,
    ``decoders``, ``eval_sets`` and ``image_mean`` (0 or 1). Raises :class:`~decapflow.errors.UnknownBank` when
    there is no such bank, and :class:`~decapflow.errors.BankError` when shallow clones still read its files (then
    nothing is deleted). Deleting a clone drops the pin its source kept for it. The history records the deletion."""
    store = get_store(store)
    registry = Registry(store)
    bank = registry.open(writable(name, "memory rm"))
    clones = clones_of(bank)
    if clones:
        shown = ", ".join(f"{c} (shares v{v})" for c, v in clones.items())
        raise BankError(f"bank {name!r} has shallow clones that read its files: {shown}; delete them first")
    source = source_of(registry, name)
    rows = registry.drop(name)
    if source is not None:  # this bank was a clone: its source may clean that version up now
        source_bank, _ = source
        if registry.exists(source_bank):
            delete_tag(registry.open(source_bank), clone_pin(name), history.Change("delete", details={
                "clone": name}))
    history.record(store, name, history.Change("delete"), version=bank.version, rows=0, removed=rows)
    return {"rows": rows, "decoders": decoders(store).drop_bank(name), "eval_sets": drop_eval_sets(name, store),
            "image_mean": int(drop_image_mean(name, store))}
