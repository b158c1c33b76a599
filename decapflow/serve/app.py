"""``decapflow serve``: a FastAPI app that captions images against any registered memory bank.

Routes (JSON; every error is ``{"error": {"code", "message"}}``):

    POST /v1/captions                 images (multipart files or base64 JSON) + memory, decoder, strategy, tau, ...
    GET  /v1/banks                    the banks with rows, encoder, version and current decoder
    GET  /v1/banks/{name}             one bank described (as ``memory show --json``) with its current decoder
    GET  /v1/banks/{name}/search?q=   the bank sentences nearest to a text
    GET  /healthz  /readyz  /metrics  alive; preloaded banks loaded; Prometheus text
    GET  /                            the page: pick a bank, drop an image, read its caption and support

Images are decoded and preprocessed in worker threads, then captioned in micro-batches on one compute thread
(:mod:`decapflow.serve.batcher`); the event loop never runs torch. The server only reads banks and decoders.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from decapflow import __version__
from decapflow.captioner import Options
from decapflow.decoder.checkpoint import current_meta
from decapflow.memory import Registry
from decapflow.serve.batcher import MicroBatcher
from decapflow.serve.errors import ApiError, error_response, install_handlers
from decapflow.serve.gate import BodyLimit, Gate
from decapflow.serve.inputs import Upload, decode_upload, read_caption_request
from decapflow.serve.metrics import Metrics
from decapflow.serve.pool import CaptionerPool

PAGE = Path(__file__).with_name("static") / "index.html"


@dataclass
class ServeSettings:
    store: str | None = None
    device: str | None = None
    preload: list[str] = field(default_factory=list)
    max_banks: int = 4
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    max_images: int = 64  # per request
    max_pixels: int = 50_000_000  # per image, checked from the header before decoding
    max_queue: int = 1024  # images waiting for a batch before requests get 503
    api_key: str | None = None
    threads: int | None = None  # torch CPU threads for the compute thread


class Server:
    """What the routes share: the pool of loaded captioners, the batcher, its compute thread, metrics."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.pool = CaptionerPool(settings.store, settings.device, settings.max_banks)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decapflow-compute")
        self.batcher = MicroBatcher(self._run_batch, self.compute, settings.max_batch, settings.max_wait_ms,
                                    settings.max_queue)
        self.metrics = Metrics(lambda: self.batcher.depth, lambda: len({b["bank"] for b in self.pool.loaded()}))
        self.batcher.on_batch = self.metrics.batch_size.observe
        self.ready = asyncio.Event()
        self.preload_error: str | None = None

    def _run_batch(self, key: Hashable, pixels: list[Any]) -> list[tuple[Any, int, str | None]]:
        """On the compute thread: encode -> project -> decode one batch with the bank's freshest captioner."""
        bank, decoder, options = key  # type: ignore[misc]
        captioner = self.pool.captioner(bank, decoder, needs_decoder=options.strategy != "clipre")
        captions = captioner.with_options(options).caption(pixels)
        self.metrics.images.inc(len(pixels))
        return [(c, captioner.bank_version, captioner.decoder_id) for c in captions]

    def _prepare(self, bank: str, uploads: list[Upload]) -> list[Any]:
        """In a worker thread: check and decode each upload, then CLIP's preprocessing (resize, normalise)."""
        preprocess = self.pool.encoder(bank).preprocess
        return [preprocess(decode_upload(u, i, self.settings.max_pixels)) for i, u in enumerate(uploads)]

    async def preload(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.compute, self.pool.preload, self.settings.preload)
        except Exception as exc:  # readyz reports it; the server keeps serving other banks
            self.preload_error = f"{type(exc).__name__}: {exc}"
        else:
            self.ready.set()

    async def on_compute(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    server = Server(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.threads:
            await server.on_compute(_set_threads, settings.threads)
        task = asyncio.create_task(server.preload())
        yield
        task.cancel()
        await server.batcher.close()
        server.compute.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="decapflow", version=__version__, lifespan=lifespan,
                  description="Caption images against any registered memory bank (DeCap projection decoding).")
    app.state.server = server
    install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 2**20))
    app.add_middleware(Gate, api_key=settings.api_key, metrics=server.metrics, open_paths={"/healthz"})
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if server.ready.is_set():
            return JSONResponse({"status": "ready", "preloaded": settings.preload})
        if server.preload_error:
            return error_response(503, "preload_failed", server.preload_error)
        return error_response(503, "not_ready", f"still loading {', '.join(settings.preload)}")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/captions")
    async def captions(request: Request) -> dict[str, Any]:
        """Caption one or more images. Multipart: files under ``images`` plus form fields; JSON:
        ``{"memory": "coco", "images": ["<base64>", {"name": "a.jpg", "data": "<base64>"}], "strategy": "pd"}``."""
        started = time.perf_counter()
        params, uploads = await read_caption_request(request, settings.max_images)
        pixels = await asyncio.to_thread(server._prepare, params.memory, uploads)
        prepared = time.perf_counter()
        key = (params.memory, params.decoder, params.options())
        results = await server.batcher.submit(key, pixels)
        done = time.perf_counter()
        return {
            "memory": params.memory,
            "results": [_result(upload, cap, version, decoder, info)
                        for upload, ((cap, version, decoder), info) in zip(uploads, results, strict=True)],
            "timings_ms": {"prepare": _ms(prepared - started), "caption": _ms(done - prepared),
                           "total": _ms(done - started)},
        }

    @app.get("/v1/banks")
    async def banks() -> list[dict[str, Any]]:
        return await asyncio.to_thread(_list_banks, settings.store)

    @app.get("/v1/banks/{name}")
    async def bank(name: str) -> dict[str, Any]:
        def describe() -> dict[str, Any]:
            info = Registry(settings.store).open(name).describe()
            return {**info, "decoder": current_meta(name)}

        return await asyncio.to_thread(describe)

    @app.get("/v1/banks/{name}/search")
    async def search(name: str, q: str = Query(min_length=1, max_length=2000),
                     k: int = Query(10, ge=1, le=100)) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            vector = server.pool.encoder(name).encode_text([q])[0]
            return [{"text": h.text, "score": round(h.score, 4), "row": h.row} for h in server.pool.bank(name).search(vector, k)]

        return await server.on_compute(run)

    return app


def _list_banks(store: str | None) -> list[dict[str, Any]]:
    registry = Registry(store)
    rows = []
    for name in registry.names():
        b = registry.open(name)
        meta = current_meta(name)
        rows.append({"name": name, "rows": len(b), "encoder": b.encoder, "dim": b.dim, "version": b.version,
                     "decoder": meta["id"] if meta else None})
    return rows


def _result(upload: Upload, cap: Any, version: int, decoder: str | None, info: Any) -> dict[str, Any]:
    return {
        "image": upload.name, "caption": cap.caption, "strategy": cap.strategy,
        "support": [{"text": t, "weight": w} for t, w in cap.support],
        "bank_version": version, "decoder": decoder,
        "batch": {"size": info.size, "queued_ms": _ms(info.queued_s), "run_ms": _ms(info.run_s)},
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


__all__ = ["Options", "ServeSettings", "create_app", "ApiError"]
