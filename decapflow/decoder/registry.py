"""The decoder registry of each memory bank: which decoders exist, which one is current. No torch needed.

The decoders of memory bank ``B`` live under ``<home>/decoders/<B>/<id>/`` with ids like
``20261127-031500-3fa2c1`` (UTC time, then a hash of the weights); ``<home>/decoders/<B>/current`` names the
decoder in use and is replaced atomically. Writing checkpoints is :func:`decapflow.decoder.checkpoint.register`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from decapflow.config import home
from decapflow.errors import NoDecoder, UnknownDecoder

__all__ = ["NoDecoder", "UnknownDecoder", "current_decoder", "current_meta", "decoders_dir", "find_decoder",
           "list_decoders", "set_current"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a bank folder or a decoder id: one path component


def decoders_dir(bank: str) -> Path:
    """``<home>/decoders/<bank>`` (not created)."""
    if not _NAME.match(bank):
        raise ValueError(f"invalid bank name {bank!r}: use letters, digits, '.', '_' and '-'")
    return home() / "decoders" / bank


def set_current(bank: str, decoder_id: str) -> None:
    """Make ``decoder_id`` the decoder in use for ``bank`` (the ``current`` file is replaced atomically)."""
    root = decoders_dir(bank)
    if not (root / decoder_id / "model.safetensors").is_file():
        known = [d["id"] for d in list_decoders(bank)]
        raise ValueError(f"bank {bank!r} has no decoder {decoder_id!r}; registered: {known}")
    tmp = root / f".current.{os.getpid()}.tmp"
    tmp.write_text(decoder_id + "\n")
    os.replace(tmp, root / "current")


def current_decoder(bank: str) -> Path | None:
    """The folder of ``bank``'s current decoder, or None when none is registered or set."""
    root = decoders_dir(bank)
    marker = root / "current"
    if not marker.is_file():
        return None
    folder = root / marker.read_text().strip()
    return folder if folder.is_dir() else None


def current_meta(bank: str) -> dict[str, Any] | None:
    """The ``meta.json`` of ``bank``'s current decoder plus its ``id``, or None when it has none."""
    folder = current_decoder(bank)
    if folder is None:
        return None
    meta_path = folder / "meta.json"
    return {**(json.loads(meta_path.read_text()) if meta_path.is_file() else {}), "id": folder.name}


def find_decoder(decoder: str, bank: str) -> Path:
    """The folder of a registered decoder named by id: ``ID`` (``bank``'s own first, then any bank's) or
    ``OTHER_BANK/ID``. Names only, never paths, so a server can take them from its clients."""
    owner, _, decoder_id = decoder.rpartition("/")
    if not _NAME.match(decoder_id) or (owner and not _NAME.match(owner)):
        raise UnknownDecoder(f"invalid decoder id {decoder!r}: use ID or BANK/ID (see: decapflow decoder list BANK)")
    root = home() / "decoders"
    banks = [owner] if owner else [bank, *sorted(p.name for p in root.glob("*") if p.name != bank)]
    for name in banks:
        folder = root / name / decoder_id
        if (folder / "model.safetensors").is_file():
            return folder
    raise UnknownDecoder(f"no decoder {decoder!r} registered for bank {bank!r}"
                         f"{'' if owner else ' or any other bank'}; see: decapflow decoder list {owner or bank}")


def list_decoders(bank: str) -> list[dict[str, Any]]:
    """Every registered decoder of ``bank``, oldest first: its meta plus ``id``, ``path`` and ``current``."""
    root = decoders_dir(bank)
    if not root.is_dir():
        return []
    current = current_decoder(bank)
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta_path = folder / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        rows.append({**meta, "id": folder.name, "path": str(folder), "current": folder == current})
    return rows
