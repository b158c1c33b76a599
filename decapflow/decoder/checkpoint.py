"""Decoder checkpoints (a folder), the per-bank registry, and import/export of official DeCap checkpoints.

A checkpoint is a folder that rebuilds itself without code changes or unsafe unpickling::

    config.json        DecoderConfig (architecture, vocabulary size, start/end ids)
    model.safetensors  the weights (the tied output layer is stored once)
    vocab.json         the compact vocabulary (CLIP id of every model id)
    meta.json          bank, bank version, encoder spec, recipe, metrics, created, decapflow version, ...

:func:`register` adds a checkpoint to a bank's registry (:mod:`decapflow.decoder.registry`, which reads it
without torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from decapflow._version import __version__
from decapflow.decoder.model import DeCapDecoder, DecoderConfig
from decapflow.decoder.registry import (  # noqa: F401  (the registry's names, importable from here too)
    NoDecoder,
    UnknownDecoder,
    current_decoder,
    current_meta,
    decoders,
    find_decoder,
    list_decoders,
    set_current,
)
from decapflow.decoder.vocab import END_ID, START_ID, Vocab

FILES = ("config.json", "model.safetensors", "vocab.json", "meta.json")


# ------------------------------------------------------------------------------------------- one checkpoint
def write_decoder_files(folder: Path, model: DeCapDecoder, vocab: Vocab, meta: dict[str, Any] | None = None) -> Path:
    """Write the four files into ``folder`` (created; not atomic, see :func:`save_decoder`)."""
    if len(vocab) != model.config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} ids but the model {model.config.vocab_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(model.config.to_json())
    save_model(model, str(folder / "model.safetensors"))
    vocab.save(folder / "vocab.json")
    full_meta = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "decapflow_version": __version__,
        "num_params": model.num_params(),
        **(meta or {}),
    }
    (folder / "meta.json").write_text(json.dumps(full_meta, indent=2, default=str))
    return folder


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst`` (never leaves ``dst`` half-written)."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def save_decoder(folder: Path, model: DeCapDecoder, vocab: Vocab, meta: dict[str, Any] | None = None) -> Path:
    """Save a checkpoint folder atomically (written next to it, then renamed into place)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_decoder_files(tmp, model, vocab, meta)
    replace_dir(tmp, folder)
    return folder


def load_decoder(folder: Path, device: str | torch.device = "cpu") -> tuple[DeCapDecoder, Vocab, dict[str, Any]]:
    """Rebuild ``(model, vocab, meta)`` from a checkpoint folder; the model is in eval mode on ``device``."""
    folder = Path(folder)
    if missing := [f for f in FILES if not (folder / f).is_file()]:
        raise ValueError(f"{folder} is not a decoder checkpoint: missing {missing}")
    model = DeCapDecoder(DecoderConfig.from_json((folder / "config.json").read_text()))
    load_model(model, str(folder / "model.safetensors"), device="cpu")
    vocab = Vocab.load(folder / "vocab.json")
    if len(vocab) != model.config.vocab_size:
        raise ValueError(f"{folder}: vocab.json has {len(vocab)} ids, config.json {model.config.vocab_size}")
    meta = json.loads((folder / "meta.json").read_text())
    return model.to(device).eval(), vocab, meta


# ------------------------------------------------------------------------------------------- registry
def _weights_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:6]


def register(
    bank: str, source: Path | DeCapDecoder, vocab: Vocab | None = None, meta: dict[str, Any] | None = None,
    *, make_current: bool = True, store: str | None = None,
) -> str:
    """Add a decoder to ``bank``'s registry in the store and return its id.

    ``source`` is a checkpoint folder (copied) or a model (saved with ``vocab`` and ``meta``); the copy's
    ``meta.json`` gets ``"bank": bank`` unless it names one. It is recorded as a ``challenger``;
    ``make_current`` also makes it current, unconditionally (see :mod:`decapflow.lifecycle.gate` for the gated way)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="decapflow-register-") as tmp_root:
        tmp = Path(tmp_root) / "decoder"
        if isinstance(source, DeCapDecoder):
            if vocab is None:
                raise ValueError("register(bank, model, vocab, meta): a model needs its vocabulary")
            write_decoder_files(tmp, source, vocab, meta)
        else:
            load_decoder(source)  # validate before copying
            shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("train_state.pt"))
            if meta:
                saved = json.loads((tmp / "meta.json").read_text())
                (tmp / "meta.json").write_text(json.dumps({**saved, **meta}, indent=2, default=str))
        meta_path = tmp / "meta.json"
        saved = json.loads(meta_path.read_text())
        saved.setdefault("bank", bank)
        meta_path.write_text(json.dumps(saved, indent=2, default=str))
        decoder_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{_weights_hash(tmp)}"
        registry = decoders(store)
        registry.add(bank, tmp, decoder_id)
    if make_current:
        registry.set_current(bank, decoder_id, reason="registered as current")
    return decoder_id


# ------------------------------------------------------------------------------------------- official DeCap
_GPT = "decoder.transformer."
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2 Conv1D: weight [in, out]
_LAYER_PARAMS = ("ln_1", "ln_2", *_CONV1D)


def _official_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, found {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    needed = [_GPT + "wte.weight", _GPT + "wpe.weight", "clip_project.model.0.weight"]
    if missing := [k for k in needed if k not in state]:
        raise ValueError(f"{path} is not an official DeCap checkpoint: missing {missing}")
    if "clip_project.model.2.weight" in state:
        raise ValueError(f"{path}: clip_project is a multi-layer MLP; only the paper's single Linear is supported")
    return state


def import_official(
    path: Path, n_head: int = 4, device: str | torch.device = "cpu"
) -> tuple[DeCapDecoder, Vocab, dict[str, Any]]:
    """Load an official DeCap ``torch.save``d state_dict (``decoder.transformer.*``, ``decoder.lm_head.weight``,
    ``clip_project.model.0.*``) into a :class:`DeCapDecoder` with an identity vocabulary.

    Sizes (vocabulary, width, positions, layers, prefix size) are read from the tensors; the head count is not
    stored in a state_dict, so pass ``n_head`` (the paper: 4). The official code feeds the projected CLIP
    vector as position 0 before the token embeddings, which is our layout too."""
    state = _official_state(Path(path))
    vocab_size, n_embd = state[_GPT + "wte.weight"].shape
    n_layer = len({k.split(".")[3] for k in state if k.startswith(_GPT + "h.")})
    inner = state[_GPT + "h.0.mlp.c_fc.weight"].shape[1]
    if inner != 4 * n_embd:
        raise ValueError(f"MLP width {inner} is not 4×{n_embd}; only GPT-2's default n_inner is supported")
    config = DecoderConfig(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, prefix_dim=state["clip_project.model.0.weight"].shape[1],
        block_size=state[_GPT + "wpe.weight"].shape[0], vocab_size=vocab_size, dropout=0.0,
        start_id=START_ID, end_id=END_ID,
    )
    mine: dict[str, torch.Tensor] = {
        "wte.weight": state[_GPT + "wte.weight"], "wpe.weight": state[_GPT + "wpe.weight"],
        "ln_f.weight": state[_GPT + "ln_f.weight"], "ln_f.bias": state[_GPT + "ln_f.bias"],
        "prefix_proj.weight": state["clip_project.model.0.weight"],
        "prefix_proj.bias": state["clip_project.model.0.bias"],
    }
    for i in range(n_layer):
        for name in _LAYER_PARAMS:
            weight = state[f"{_GPT}h.{i}.{name}.weight"]
            mine[f"blocks.{i}.{name}.weight"] = weight.t() if name in _CONV1D else weight
            mine[f"blocks.{i}.{name}.bias"] = state[f"{_GPT}h.{i}.{name}.bias"]
    head = state.get("decoder.lm_head.weight")
    if head is not None and not torch.equal(head, mine["wte.weight"]):
        raise ValueError("decoder.lm_head.weight differs from wte: untied output layers are not supported")
    model = DeCapDecoder(config)
    model.load_state_dict({**mine, "lm_head.weight": mine["wte.weight"]}, strict=True)
    meta = {"source": "official-decap", "imported_from": str(path), "n_head": n_head}
    return model.to(device).eval(), Vocab.identity(vocab_size, drop_clip_ids=(0,)), meta


def export_official(model: DeCapDecoder) -> dict[str, torch.Tensor]:
    """The model as an official-layout state_dict (needs an identity vocabulary's full-size embedding)."""
    state = {
        _GPT + "wte.weight": model.wte.weight, _GPT + "wpe.weight": model.wpe.weight,
        _GPT + "ln_f.weight": model.ln_f.weight, _GPT + "ln_f.bias": model.ln_f.bias,
        "decoder.lm_head.weight": model.wte.weight,
        "clip_project.model.0.weight": model.prefix_proj.weight, "clip_project.model.0.bias": model.prefix_proj.bias,
    }
    for i, block in enumerate(model.blocks):
        for name in _LAYER_PARAMS:
            layer = block.get_submodule(name)
            state[f"{_GPT}h.{i}.{name}.weight"] = layer.weight.t() if name in _CONV1D else layer.weight
            state[f"{_GPT}h.{i}.{name}.bias"] = layer.bias
    return {k: v.detach().clone().contiguous() for k, v in state.items()}
