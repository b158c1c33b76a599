"""Which decoder captions a bank: a checkpoint folder, a registered id or the bank's current one, and the check
that it was trained on the bank's encoder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from decapflow.decoder.checkpoint import current_decoder, find_decoder
from decapflow.errors import BankError, NoDecoder

if TYPE_CHECKING:
    from decapflow.bank.memory import MemoryBank


def check_decoder_encoder(meta: dict[str, Any], folder: Path, bank: MemoryBank) -> None:
    """Refuse a decoder trained on another encoder's embeddings than the bank's."""
    if meta.get("encoder") not in (None, bank.encoder):
        raise BankError(f"decoder {folder.name} was trained on embeddings of {meta['encoder']!r}, "
                        f"bank {bank.name!r} holds {bank.encoder!r}")


def resolve_decoder(bank: str, decoder: str | None, allow_paths: bool = True, store: Any = None) -> Path:
    """A decoder folder: ``decoder`` as a checkpoint folder (when ``allow_paths``; a server does not take paths
    from its clients) or a registered id (``ID`` or ``BANK/ID``, see :func:`find_decoder`), else the bank's
    current one."""
    if decoder:
        if allow_paths and (Path(decoder) / "model.safetensors").is_file():
            return Path(decoder)
        return find_decoder(decoder, bank, store)
    folder = current_decoder(bank, store)
    if folder is None:
        raise NoDecoder(f"bank {bank!r} has no decoder yet; train one with: decapflow train --memory {bank}, "
                        f"or use strategy 'clipre'")
    return folder
