"""The DeCap decoder: model (KV-cached greedy and beam generation), text-only training, checkpoints.

Typical use::

    from decapflow.decoder import TrainRecipe, train_decoder, load_decoder
    result = train_decoder(texts, vectors, config="decap-small", recipe=TrainRecipe(), out_dir=run_dir)
    model, vocab, meta = load_decoder(result.best)
    captions = model.decode_texts(prefix_vectors, vocab)
"""

from decapflow.decoder.checkpoint import (
    current_decoder,
    export_official,
    import_official,
    list_decoders,
    load_decoder,
    register,
    save_decoder,
    set_current,
)
from decapflow.decoder.model import DeCapDecoder, DecoderConfig, build_decoder, list_configs, load_config
from decapflow.decoder.train import TrainRecipe, TrainResult, train_decoder
from decapflow.decoder.vocab import END_ID, START_ID, Vocab, tokenize

__all__ = [
    "END_ID", "START_ID", "DeCapDecoder", "DecoderConfig", "TrainRecipe", "TrainResult", "Vocab",
    "build_decoder", "current_decoder", "export_official", "import_official", "list_configs", "list_decoders",
    "load_config", "load_decoder", "register", "save_decoder", "set_current", "tokenize", "train_decoder",
]
