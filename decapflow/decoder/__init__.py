"""The DeCap decoder: model (KV-cached greedy and beam generation), text-only training, checkpoints.

Typical use::

    from decapflow.decoder import TrainRecipe, train_decoder, load_decoder
    result = train_decoder(texts, vectors, config="decap-small", recipe=TrainRecipe(), out_dir=run_dir)
    model, vocab, meta = load_decoder(result.best)
    captions = model.decode_texts(prefix_vectors, vocab)
"""

from __future__ import annotations

import importlib
from typing import Any

#: Where each public name lives; submodules load on first use, so ``decapflow.decoder.registry`` (no torch)
#: can be imported without the model and training code.
_HOME = {
    "checkpoint": ("export_official", "import_official", "load_decoder", "register", "save_decoder"),
    "registry": ("current_decoder", "list_decoders", "set_current"),
    "model": ("DeCapDecoder", "DecoderConfig", "build_decoder", "list_configs", "load_config"),
    "train": ("TrainRecipe", "TrainResult", "train_decoder"),
    "vocab": ("END_ID", "START_ID", "Vocab", "tokenize"),
}
_WHERE = {name: module for module, names in _HOME.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'decapflow.decoder' has no attribute {name!r}")
    return getattr(importlib.import_module(f"decapflow.decoder.{_WHERE[name]}"), name)
