"""Warm captioners for a server: banks, decoders and encoders loaded once, kept fresh, least recently used evicted.

A :class:`CaptionerPool` hands out a :class:`~decapflow.caption.captioner.Captioner` for ``(bank reference, decoder)``:
``NAME`` (the newest version), ``NAME@TAG`` (the version the tag pins) or ``NAME@vN`` (version N, fixed). On every
call it checks, cheaply, whether the version the reference names has moved (an ingest for ``NAME``, a tag moved for
``NAME@TAG``; :meth:`~decapflow.bank.memory.MemoryBank.refresh` costs ~1 ms) or the bank's current decoder has changed
(a promotion, a rollback; one read of the store's small ``_current`` table, ~3 ms), and if so loads the new state
before answering. Decoders and image means belong to the bank (its plain name), whatever version a reference reads. A batch already running keeps the captioner it started with, so a swap never fails a
request in flight. Banks that share an encoder share one loaded CLIP (``load_encoder`` caches by spec).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from decapflow.bank.memory import MemoryBank, Registry
from decapflow.bank.refs import BankRef
from decapflow.caption.captioner import Captioner, Options, check_decoder_encoder, resolve_decoder
from decapflow.caption.modality import load_image_mean
from decapflow.config import default_device
from decapflow.decoder.checkpoint import load_decoder
from decapflow.decoder.registry import decoders
from decapflow.encoders import Encoder, load_encoder

#: Decoders kept loaded per bank (its current one plus others clients asked for), oldest dropped first.
MAX_DECODERS_PER_BANK = 3


class CaptionerPool:
    """Loaded captioners keyed by (bank reference, decoder folder); at most ``max_banks`` references stay loaded
    (``coco`` and ``coco@prod`` count as two: they may read different versions)."""

    def __init__(self, store: str | None = None, device: str | None = None, max_banks: int = 4) -> None:
        if max_banks < 1:
            raise ValueError("max_banks must be at least 1")
        self.registry = Registry(store)
        self.device = default_device(device)
        self.max_banks = max_banks
        self._banks: OrderedDict[str, MemoryBank] = OrderedDict()  # by reference, as str(BankRef)
        self._captioners: dict[tuple[str, Path | None], Captioner] = {}
        self._decoders: dict[Path, tuple[Any, Any, dict[str, Any]]] = {}
        self._lock = threading.RLock()
        self.loads = 0  # captioners built: first loads, new bank versions, new current decoders

    # ------------------------------------------------------------------ lookups
    def bank(self, ref: str, latest: bool = True) -> MemoryBank:
        """The loaded bank ``ref`` (``NAME``, ``NAME@TAG`` or ``NAME@vN``; opened on first use; raises UnknownBank,
        or UnknownVersion for a tag or version the bank lacks), moved to the version its reference names now (the
        newest, or the tag's; ``@vN`` stays) unless ``latest`` is False."""
        key = str(BankRef.parse(ref))
        with self._lock:
            bank = self._banks.get(key)
            if bank is None:
                bank = self.registry.open(key)
                self._banks[key] = bank
                self._evict()
            elif latest:
                bank.refresh()
            self._banks.move_to_end(key)
            return bank

    def encoder(self, bank: str) -> Encoder:
        """The CLIP encoder of ``bank`` (a reference; one encoder per spec and device, shared by all banks that use
        it). A bank's encoder never changes, so this skips the version check."""
        return load_encoder(self.bank(bank, latest=False).encoder, self.device)

    def captioner(self, ref: str, decoder: str | None = None, needs_decoder: bool = True) -> Captioner:
        """The captioner for bank reference ``ref`` with ``decoder`` (default: the bank's current one), fresh."""
        with self._lock:
            bank = self.bank(ref)
            name, ref = bank.name, str(bank.ref)
            folder = (resolve_decoder(name, decoder, allow_paths=False, store=self.registry.store)
                      if needs_decoder else None)
            key = (ref, folder)
            cached = self._captioners.get(key)
            if cached is not None and cached.bank_version == bank.version:
                return cached
            model = vocab = None
            if folder is not None:
                model, vocab, meta = self._decoder(folder)
                check_decoder_encoder(meta, folder, bank)
            fresh = Captioner(load_encoder(bank.encoder, self.device), bank, model, vocab,
                              Options() if model is not None else Options(strategy="clipre"))
            fresh.decoder_path = folder
            fresh.image_mean = load_image_mean(name, bank.encoder, self.registry.store)  # ms, rerank, auto
            self.loads += 1
            mine = [k for k in self._captioners if k[0] == ref]
            fresh_keys = [k for k in mine if self._captioners[k].bank_version == bank.version]
            drop = [k for k in mine if k not in fresh_keys]  # older bank versions
            drop += fresh_keys[: max(0, len(fresh_keys) + 1 - MAX_DECODERS_PER_BANK)]  # oldest decoders
            for k in drop:
                del self._captioners[k]
            self._captioners[key] = fresh
            self._drop_unused_decoders()
            return fresh

    def loaded(self) -> list[dict[str, Any]]:
        """What is in memory: bank (the reference loaded: ``NAME``, ``NAME@TAG``, ``NAME@vN``), version, decoder id,
        rows."""
        with self._lock:
            return [{"bank": b, "bank_version": c.bank_version, "decoder": c.decoder_id, "rows": len(c.vectors)}
                    for (b, _), c in self._captioners.items()]

    def preload(self, banks: list[str]) -> None:
        """Load each bank (a reference) with its encoder and its current decoder (the bank alone when it has none
        yet)."""
        for ref in banks:
            name = BankRef.parse(ref).name
            self.captioner(ref, needs_decoder=decoders(self.registry.store).current_id(name) is not None)

    # ------------------------------------------------------------------ internals
    def _decoder(self, folder: Path) -> tuple[Any, Any, dict[str, Any]]:
        if folder not in self._decoders:
            self._decoders[folder] = load_decoder(folder, self.device)
        return self._decoders[folder]

    def _evict(self) -> None:
        while len(self._banks) > self.max_banks:
            ref, _ = self._banks.popitem(last=False)
            for key in [k for k in self._captioners if k[0] == ref]:
                del self._captioners[key]
            self._drop_unused_decoders()

    def _drop_unused_decoders(self) -> None:
        used = {folder for _, folder in self._captioners}
        for folder in [f for f in self._decoders if f not in used]:
            del self._decoders[folder]
