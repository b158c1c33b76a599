"""The ingest flow: read (streamed in the flow) -> embed (task) -> write (task, retried), chunk by chunk."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from decapflow.ingest import DEFAULT_CHUNK, embed_chunk, run_ingest, write_chunk

embed_task = task(embed_chunk, name="embed-chunk", cache_policy=NO_CACHE)
write_task = task(write_chunk, name="write-chunk", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=2)


@flow(name="decapflow-ingest")
def ingest_flow(
    path: str,
    memory: str | None = None,
    encoder: str | None = None,
    store: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    batch_size: int = 256,
    fmt: str | None = None,
    field: str | None = None,
    errors: str = "replace",
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Ingest a corpus file into a memory bank; returns the ingest report as a dict."""
    report = run_ingest(
        path, memory, encoder, store, chunk_size=chunk_size, batch_size=batch_size, fmt=fmt, field=field,
        errors=errors, device=device, progress=progress, embed=embed_task, write=write_task,
    )
    return report.to_dict()
