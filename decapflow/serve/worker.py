"""The compute worker: a separate process that holds the loaded captioners and runs captioning batches.

Captioning with small models is mostly Python (a decoding loop of small tensor ops), so in the server's own
process it would hold the GIL that the HTTP side needs for every request; measured on 2 cores with the world
bank, that halved batched throughput. In its own process the worker uses one core and the event loop another.
The server's handle on it, which replaces a worker that died, is :mod:`decapflow.serve.compute`.

Functions here run in the worker; each server's state is keyed by ``server_id`` so tests may run several. The
models' code (torch, open_clip) is imported in the worker only: the HTTP process stays small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from decapflow import cpu
from decapflow.serve.errors import ApiError
from decapflow.serve.inputs import Upload, decode_upload, decode_video_upload, is_video_upload


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
    """The worker's initializer: environment as the server's, a CPU share, an empty pool."""
    from decapflow.serve.pool import CaptionerPool

    os.environ.update(dict(settings.env))
    cpu.acquire(settings.threads, service=True)  # counted by other jobs only while it works (decapflow.cpu)
    _STATES[server_id] = _State(CaptionerPool(settings.store, settings.device, settings.max_banks),
                                settings.max_pixels)


def run_batch(server_id: str, key: tuple[str, str | None, tuple[tuple[str, Any], ...]], uploads: list[Upload]
              ) -> tuple[list[Any], dict[str, Any]]:
    """Decode, encode, project and decode text for one batch with the bank's freshest captioner.

    A video upload is captioned from the mean embedding of ``frames`` frames sampled uniformly over it (the
    ``frames`` option), an image from its own embedding; both kinds may share a batch.

    Returns one entry per upload (``(caption dict, bank version, decoder id)``, or the ApiError of an image
    or video that could not be read, which fails that request alone) and :func:`status`."""
    from decapflow.caption.captioner import Options
    from decapflow.caption.video import DEFAULT_FRAMES, embed_media, embed_video

    cpu.tick()  # "busy", and this batch's share of the CPUs
    state = _STATES[server_id]
    bank, decoder, values = key
    values = dict(values)
    frames = values.pop("frames", DEFAULT_FRAMES)
    options = Options(**values)
    captioner = state.pool.captioner(bank, decoder, needs_decoder=options.strategy != "clipre")
    results: list[Any] = []
    pixels = []  # preprocessed images, or a video's unit embedding
    for upload in uploads:
        try:
            if is_video_upload(upload):
                video = decode_video_upload(upload, state.max_pixels, frames)
                pixels.append(embed_video(captioner.encoder, video, options.batch_size))
            else:
                pixels.append(captioner.encoder.preprocess(decode_upload(upload, state.max_pixels)))
            results.append(None)
        except ApiError as exc:  # this upload alone cannot be read
            results.append(exc)
    captioner = captioner.with_options(options)
    captions = iter(captioner.caption_embeddings(embed_media(captioner.encoder, pixels, options.batch_size))
                    if pixels else [])
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
    if not _STATES:
        cpu.release()

