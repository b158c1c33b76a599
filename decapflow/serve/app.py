"""``decapflow serve``: a FastAPI app that captions images against any registered memory bank.

Routes (JSON; every error is ``{"error": {"code", "message"}}``):

    POST /v1/captions                 images or videos (multipart files or base64 JSON) + memory, strategy, ...
    GET  /v1/banks                    the banks with rows, encoder, version and current decoder
    GET  /v1/banks/{ref}              one bank described (as ``memory show --json``) with its tags and current decoder
    GET  /v1/banks/{ref}/search?q=    the bank sentences nearest to a text

A bank is named by a reference wherever a client names one (``memory``, ``{ref}``): ``NAME`` reads its newest
version, ``NAME@TAG`` the version the tag pins (followed when the tag moves), ``NAME@vN`` version N.
    GET  /healthz  /readyz  /metrics  alive; preloaded banks loaded; Prometheus text
    GET  /                            the page: pick a bank, drop an image, read its caption and support

Requests are gathered into micro-batches (:mod:`decapflow.serve.batcher`) that a compute worker process decodes,
encodes, projects and captions (:mod:`decapflow.serve.worker`), so the event loop never runs torch nor shares a
GIL with it. The server only reads banks and decoders.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from decapflow._version import __version__
from decapflow.bank.memory import Registry
from decapflow.bank.refs import BankRef
from decapflow.decoder.registry import current_meta
from decapflow.serve import worker
from decapflow.serve.batcher import MicroBatcher
from decapflow.serve.compute import ComputeWorker
from decapflow.serve.docs import install_docs
from decapflow.serve.errors import ApiError, error_response, install_handlers
from decapflow.serve.gate import BodyLimit, Gate
from decapflow.serve.inputs import Upload, read_caption_request
from decapflow.serve.metrics import Metrics
from decapflow.serve.worker import WorkerSettings

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
    threads: int | None = None  # torch CPU threads of the compute worker
    compute: str = "process"  # "process": the models in a worker process; "thread": in this one
    worker_start_timeout_s: float = 60.0  # how long a request waits for a restarted worker before a 503


#: What the compute worker takes from the server's environment (a forkserver's children do not inherit it).
WORKER_ENV = ("DECAPFLOW_HOME", "DECAPFLOW_STORE", "DECAPFLOW_DEVICE", "HF_HUB_OFFLINE", "HF_HOME")


class Server:
    """What the routes share: the compute worker (a process holding the models), the batcher, metrics."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.id = uuid.uuid4().hex
        env = tuple((k, v) for k, v in os.environ.items() if k in WORKER_ENV)
        self.worker_settings = WorkerSettings(settings.store, settings.device, settings.max_banks,
                                              settings.max_pixels, settings.threads, env)
        self.compute = ComputeWorker(self.id, self.worker_settings, settings.compute, settings.preload,
                                     settings.worker_start_timeout_s, on_status=self._on_status)
        self.reading = 0  # requests whose bodies are being read: more images on the way
        self.batcher = MicroBatcher(self._run_batch, settings.max_batch, settings.max_wait_ms, settings.max_queue,
                                    arriving=lambda: self.reading)
        self.worker_status: dict[str, Any] = {"pid": None, "loaded": []}  # as of the worker's last answer
        self.metrics = Metrics(lambda: self.batcher.depth,
                               lambda: len({row["bank"] for row in self.worker_status["loaded"]}))
        self.batcher.on_batch = self.metrics.batch_size.observe
        self.ready = asyncio.Event()
        self.preload_error: str | None = None

    async def call(self, fn: Any, *args: Any) -> Any:
        """Run ``worker.fn(server_id, *args)`` on the compute worker. A dead worker is replaced: what it was
        running fails with 503 ``worker_restarted`` (Retry-After), the rest waits for the new one."""
        return await self.compute.call(fn, *args)

    def _on_status(self, status: dict[str, Any]) -> None:
        self.worker_status = status

    async def _run_batch(self, key: Hashable, uploads: list[Upload]) -> list[Any]:
        results, self.worker_status = await self.call(worker.run_batch, key, uploads)
        self.metrics.images.inc(sum(not isinstance(r, Exception) for r in results))
        return results

    async def preload(self) -> None:
        try:
            self.worker_status = await self.call(worker.preload, self.settings.preload)
        except Exception as exc:  # readyz reports it; the server keeps serving other banks
            self.preload_error = f"{type(exc).__name__}: {exc}"
        else:
            self.ready.set()

    async def close(self) -> None:
        await self.batcher.close()
        self.compute.close()


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    server = Server(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(server.preload())
        yield
        task.cancel()
        await server.close()

    app = FastAPI(title="decapflow", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Caption images against any registered memory bank (DeCap projection decoding).")
    install_docs(app)  # /docs and /redoc with their JS/CSS served from here (offline), not from a CDN
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
            return JSONResponse({"status": "ready", "preloaded": settings.preload, "compute": settings.compute,
                                 "worker": server.worker_status})
        if server.preload_error:
            return error_response(503, "preload_failed", server.preload_error)
        return error_response(503, "not_ready", f"still loading {', '.join(settings.preload)}")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/captions")
    async def captions(request: Request) -> dict[str, Any]:
        """Caption one or more images or videos. Multipart: files under ``images`` plus form fields; JSON:
        ``{"memory": "coco", "images": ["<base64>", {"name": "a.jpg", "data": "<base64>"}], "strategy": "pd"}``.
        A video (by file name, .mp4 .mov .webm ..., or by its first bytes) gets one caption from the mean
        embedding of ``frames`` frames sampled uniformly over it."""
        started = time.perf_counter()
        server.reading += 1
        try:
            params, uploads = await read_caption_request(request, settings.max_images)
        finally:
            server.reading -= 1
        read = time.perf_counter()
        results = await server.batcher.submit((params.memory, params.decoder, params.options()), uploads)
        for index, result in enumerate(results):
            if isinstance(result, ApiError) and result.code in ("invalid_image", "invalid_video"):  # say which
                raise ApiError(422, result.code, f"image {index} ({uploads[index].name}): {result.message}",
                               image=index)
            if isinstance(result, Exception):
                raise result
        done = time.perf_counter()
        return {
            "memory": params.memory,  # the reference, as NAME, NAME@TAG or NAME@vN; each result says its version
            "bank": BankRef.parse(params.memory).name,
            "results": [_result(upload, cap, version, decoder, info)
                        for upload, ((cap, version, decoder), info) in zip(uploads, results, strict=True)],
            "timings_ms": {"read": _ms(read - started), "caption": _ms(done - read),
                           "total": _ms(done - started)},
        }

    @app.get("/v1/banks")
    async def banks() -> list[dict[str, Any]]:
        return await asyncio.to_thread(_list_banks, settings.store)

    @app.get("/v1/banks/{ref}")
    async def bank(ref: str) -> dict[str, Any]:
        """One bank at the version ``ref`` names (``NAME``, ``NAME@TAG``, ``NAME@vN``), with its tags and its current
        decoder."""
        parsed = _reference(ref)

        def describe() -> dict[str, Any]:
            opened = Registry(settings.store).open(parsed)
            tags = {tag: version for tag, version in opened.tags().items() if not tag.startswith("_")}
            return {**opened.describe(), "ref": str(parsed), "tags": tags,
                    "decoder": current_meta(parsed.name, settings.store)}

        return await asyncio.to_thread(describe)

    @app.get("/v1/banks/{ref}/search")
    async def search(ref: str, q: str = Query(min_length=1, max_length=2000),
                     k: int = Query(10, ge=1, le=100)) -> list[dict[str, Any]]:
        return await server.call(worker.search, str(_reference(ref)), q, k)

    return app


def _reference(ref: str) -> BankRef:
    try:
        return BankRef.parse(ref)
    except ValueError as exc:
        raise ApiError(422, "invalid_parameter", str(exc)) from None


def _list_banks(store: str | None) -> list[dict[str, Any]]:
    registry = Registry(store)
    return [{**registry.open(name).summary(), "decoder": (current_meta(name, store) or {}).get("id")}
            for name in registry.names()]


def _result(upload: Upload, cap: dict[str, Any], version: int, decoder: str | None, info: Any) -> dict[str, Any]:
    return {
        "image": upload.name, "caption": cap["caption"], "strategy": cap["strategy"],
        "support": [{"text": t, "weight": w} for t, w in cap["support"]],
        "bank_version": version, "decoder": decoder,
        "batch": {"size": info.size, "queued_ms": _ms(info.queued_s), "run_ms": _ms(info.run_s)},
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)

