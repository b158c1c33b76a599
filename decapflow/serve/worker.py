"""The compute worker: a separate process that holds the loaded captioners and runs captioning batches.

Captioning with small models is mostly Python (a decoding loop of small tensor ops), so in the server's own
process it would hold the GIL that the HTTP side needs for every request; measured on 2 cores with the world
bank, that halved batched throughput. In its own process the worker uses one core and the event loop another.
A worker that dies (out of memory, a crash in native code) is replaced by the server on the next call.

Functions here run in the worker; each server's state is keyed by ``server_id`` so tests may run several. The
models' code (torch, open_clip) is imported in the worker only: the HTTP process stays small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from decapflow.serve.errors import ApiError
from decapflow.serve.inputs import Upload, decode_upload


@dataclass(frozen=True)
class WorkerSettings:
    store: str | None
    device: str | None
    max_banks: int
    max_pixels: int
    threads: int | None
    env: tuple[tuple[str, str], ...] = ()  # DECAPFLOW_HOME and friends, as the server saw them


@dataclass
class _State:
    pool: Any  # CaptionerPool
    max_pixels: int


_STATES: dict[str, _State] = {}


def init(server_id: str, settings: WorkerSettings) -> None:
    """The worker's initializer: environment as the server's, torch threads, an empty pool."""
    from decapflow.serve.pool import CaptionerPool

    os.environ.update(dict(settings.env))
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    _STATES[server_id] = _State(CaptionerPool(settings.store, settings.device, settings.max_banks),
                                settings.max_pixels)


def run_batch(server_id: str, key: tuple[str, str | None, tuple[tuple[str, Any], ...]], uploads: list[Upload]
              ) -> tuple[list[Any], dict[str, Any]]:
    """Decode, encode, project and decode text for one batch with the bank's freshest captioner.

    Returns one entry per upload (``(caption dict, bank version, decoder id)``, or the ApiError of an image
    that could not be read, which fails that request alone) and :func:`status`."""
    from decapflow.captioner import Options

    state = _STATES[server_id]
    bank, decoder, values = key
    options = Options(**dict(values))
    captioner = state.pool.captioner(bank, decoder, needs_decoder=options.strategy != "clipre")
    results: list[Any] = []
    pixels = []
    for upload in uploads:
        try:
            pixels.append(captioner.encoder.preprocess(decode_upload(upload, state.max_pixels)))
            results.append(None)
        except ApiError as exc:  # this image alone cannot be read
            results.append(exc)
    captions = iter(captioner.with_options(options).caption(pixels) if pixels else [])
    out = [r if r is not None else (next(captions).to_dict(), captioner.bank_version, captioner.decoder_id)
           for r in results]
    return out, status(server_id)


def status(server_id: str) -> dict[str, Any]:
    """The worker's process id and what it has loaded."""
    return {"pid": os.getpid(), "loaded": _STATES[server_id].pool.loaded()}


def preload(server_id: str, banks: list[str]) -> dict[str, Any]:
    _STATES[server_id].pool.preload(banks)
    return status(server_id)


def search(server_id: str, bank: str, query: str, k: int) -> list[dict[str, Any]]:
    pool = _STATES[server_id].pool
    vector = pool.encoder(bank).encode_text([query])[0]
    return [{"text": h.text, "score": round(h.score, 4), "row": h.row} for h in pool.bank(bank).search(vector, k)]


def close(server_id: str) -> None:
    _STATES.pop(server_id, None)
