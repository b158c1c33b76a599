"""decapflow: turn plain text into image captioners (DeCap, ICLR 2023).

The pipeline, one package per stage (lowest first; each imports only itself and the stages below)::

    config, errors, encoders   settings, exceptions, the CLIP wrapper
    bank/                      corpora -> versioned memory banks (LanceDB)
    decoder/                   the DeCap decoder, its text-only training, its records
    caption/                   images/videos -> embeddings -> a strategy -> the decoder -> captions
    evaluation/                scores, strategy tables, the memory-size study
    lifecycle/                 a bank's decoder end to end: train, gate, retire; bank deletion; the demo
    serve/, cli/               thin shells: HTTP and the command line (Prefect flows live in ``flows/``)

The public API (names load on first use, so ``import decapflow`` is cheap)::

    import decapflow
    report = decapflow.ingest("corpus.txt", memory="coco")        # clean, dedupe, embed, store
    bank = decapflow.open_bank("coco")                            # len(bank), bank.version, bank.search(v)
    result = decapflow.train_bank("coco", recipe={"epochs": 10})  # train, register, promote
    for c in decapflow.caption_images(["photo.jpg"], memory="coco", strategy="pd"):
        print(c.image, c.caption, c.support[0])

Readers take a bank reference: ``"coco"`` (the newest version), ``"coco@prod"`` (the version tag ``prod`` pins) or
``"coco@v12"`` (version 12), e.g. ``open_bank("coco@prod")``, ``caption_images(..., memory="coco@v12")``,
``train_bank("coco@v12")``; writers (``ingest``) take the plain name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from decapflow._version import __version__

#: public name -> (module, name there)
_API = {
    "open_bank": ("decapflow.bank.memory", "open_bank"),
    "MemoryBank": ("decapflow.bank.memory", "MemoryBank"),
    "Registry": ("decapflow.bank.memory", "Registry"),
    "ingest": ("decapflow.bank.ingest", "run_ingest"),
    "IngestReport": ("decapflow.bank.ingest", "IngestReport"),
    "train_bank": ("decapflow.lifecycle.training", "train_bank"),
    "delete_bank": ("decapflow.lifecycle.deletion", "delete_bank"),
    "caption_images": ("decapflow.caption.files", "caption_images"),
    "Captioner": ("decapflow.caption.captioner", "Captioner"),
    "Caption": ("decapflow.caption.captioner", "Caption"),
    "Options": ("decapflow.caption.captioner", "Options"),
    "STRATEGIES": ("decapflow.caption.projection", "STRATEGIES"),
}
__all__ = [  # written out so linters see it; tests/test_layout.py checks it lists _API
    "STRATEGIES", "Caption", "Captioner", "IngestReport", "MemoryBank", "Options", "Registry", "__version__",
    "caption_images", "delete_bank", "ingest", "open_bank", "train_bank",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load lazily below
    from decapflow.bank.ingest import IngestReport
    from decapflow.bank.ingest import run_ingest as ingest
    from decapflow.bank.memory import MemoryBank, Registry, open_bank
    from decapflow.caption.captioner import Caption, Captioner, Options
    from decapflow.caption.files import caption_images
    from decapflow.caption.projection import STRATEGIES
    from decapflow.lifecycle.deletion import delete_bank
    from decapflow.lifecycle.training import train_bank


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'decapflow' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
