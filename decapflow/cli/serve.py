"""``decapflow serve``: the HTTP captioning service (FastAPI on uvicorn)."""

from __future__ import annotations

import click

from decapflow.cli.base import THREADS_HELP, main, store_option

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the server: set --api-key then.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0: any free port).")
@click.option("--preload", metavar="BANK,...", default="",
              help="Banks to load (with their current decoder and encoder) before /readyz says ready.")
@click.option("--max-banks", default=4, show_default=True, type=click.IntRange(min=1), help="Banks kept loaded; the least recently used go.")
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present).")
@click.option("--threads", type=click.IntRange(min=1), help=THREADS_HELP + " For the compute worker, which "
              "counts as a job only while it answers.")
@click.option("--compute", type=click.Choice(["process", "thread"]), default="process", show_default=True,
              help="Where the models run: a worker process (HTTP and captioning never share a GIL; a crashed "
                   "worker is restarted) or a thread of the server process.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images captioned together; concurrent requests for the same bank and options share a batch. "
                   "1 turns micro-batching off.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="How long a batch waits for more requests once it has one.")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Largest request body, in MB (else 413).")
@click.option("--max-pixels", default=50_000_000, show_default=True, type=click.IntRange(min=1),
              help="Largest image, width x height, read from its header before decoding (bigger: 422).")
@click.option("--max-images", default=64, show_default=True, type=click.IntRange(min=1), help="Most images in one request.")
@click.option("--max-queue", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Images waiting for a batch before new requests get 503 (back-pressure).")
@click.option("--api-key", envvar="DECAPFLOW_API_KEY",
              help="Require this key on every route but /healthz (Bearer, X-API-Key or Basic auth password).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level (info logs every request).")
@store_option
def serve(host: str, port: int, preload: str, max_banks: int, device: str | None, threads: int | None,
          compute: str, max_batch: int, max_wait_ms: float, max_upload_mb: float, max_pixels: int,
          max_images: int, max_queue: int, api_key: str | None, log_level: str, store: str | None) -> None:
    """Serve captioning over HTTP against every bank in the store (the page is at /).

    Banks, decoders and CLIP stay loaded; concurrent requests are batched; a bank's new version or new
    current decoder is picked up on the next request, without a restart. The API is described at /docs
    (OpenAPI JSON at /openapi.json); /healthz, /readyz and /metrics (Prometheus) are for operators.

    \b
    Example (offline world bank):
      decapflow serve --preload world
      curl -F memory=world -F images=@scene.png http://127.0.0.1:8000/v1/captions
      decapflow caption --server http://127.0.0.1:8000 --memory world scenes/
    """
    import uvicorn

    from decapflow.serve.app import ServeSettings, create_app

    if host not in LOCAL_HOSTS and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who reaches it can use it", err=True)
    settings = ServeSettings(store=store, device=device, preload=[b.strip() for b in preload.split(",") if b.strip()],
                             max_banks=max_banks, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_upload_mb=max_upload_mb, max_pixels=max_pixels, max_images=max_images,
                             max_queue=max_queue,
                             api_key=api_key, threads=threads, compute=compute)
    app = create_app(settings)
    click.echo(f"decapflow serve on http://{host}:{port}/ (API docs at /docs); Ctrl-C stops it", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level in ("info", "debug"))
