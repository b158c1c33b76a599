"""Deleting a bank as a whole: its rows (all versions), its decoders, its evaluation sets and its mean image
embedding, so that a bank created later under the same name starts clean.

This sits in the lifecycle layer because it is the lowest layer that knows all four: the rows belong to the bank
layer, decoders to the decoder layer, the image mean to captioning and the evaluation sets to the gate.
"""

from __future__ import annotations

from decapflow.bank.memory import Registry
from decapflow.bank.store import Store, get_store
from decapflow.caption.modality import drop_image_mean
from decapflow.decoder.registry import decoders
from decapflow.lifecycle.gate import drop_eval_sets

__all__ = ["delete_bank"]


def delete_bank(name: str, store: Store | str | None = None) -> dict[str, int]:
    """Delete bank ``name`` and everything that belongs to it. Returns how many of each went: ``rows``,
    ``decoders``, ``eval_sets`` and ``image_mean`` (0 or 1). Raises :class:`~decapflow.errors.UnknownBank` when
    there is no such bank (then nothing is deleted)."""
    store = get_store(store)
    rows = Registry(store).drop(name)
    return {"rows": rows, "decoders": decoders(store).drop_bank(name), "eval_sets": drop_eval_sets(name, store),
            "image_mean": int(drop_image_mean(name, store))}
