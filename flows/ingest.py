"""The ingest flow: read (streamed in the flow) -> embed (task) -> write (task, retried), chunk by chunk.

With ``workers`` or ``cluster`` the embed tasks run on Dask workers through prefect-dask's ``DaskTaskRunner``
(:func:`dask_ingest_flow` builds the flow with it); commits stay in corpus order, one per chunk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Flow, flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from decapflow.bank.dask_embed import embed_texts, encoder_info
from decapflow.bank.ingest import (
    DEFAULT_CHUNK,
    bank_name_for,
    embed_chunk,
    encoder_for,
    run_ingest,
    write_chunk,
)
from decapflow.errors import BankError
from flows.prefect_env import STORE_RETRIES
from flows.report import ingest_summary, run_pulse

embed_task = task(embed_chunk, name="embed-chunk", cache_policy=NO_CACHE)
write_task = task(write_chunk, name="write-chunk", cache_policy=NO_CACHE, **STORE_RETRIES)
embed_texts_task = task(embed_texts, name="embed-chunk-remote", cache_policy=NO_CACHE, retries=2,
                        retry_delay_seconds=5)  # a lost Dask worker
encoder_info_task = task(encoder_info, name="encoder-info", cache_policy=NO_CACHE)


class TaskEmbedder:
    """Embedding as Prefect task submissions (on Dask workers when the flow's task runner is a DaskTaskRunner)."""

    def __init__(self, spec: str, device: str | None, batch_size: int, window: int) -> None:
        self.spec, self.dim = encoder_info_task.submit(spec, device).result()
        self.device, self.batch_size, self.window = device, batch_size, window

    def submit(self, texts: list[str]) -> Any:
        return embed_texts_task.submit(self.spec, self.device, texts, self.batch_size)


def ingest_run_name() -> str:
    """``ingest-BANK`` (the bank the file goes to, named or derived from the file name)."""
    path, memory = flow_run.parameters["path"], flow_run.parameters.get("memory")
    try:
        return f"ingest-{bank_name_for(Path(path), memory)}"
    except BankError:  # the flow says why; the name only needs to be readable
        return f"ingest-{memory or Path(path).name}"


@flow(name="decapflow-ingest", flow_run_name=ingest_run_name)
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
    workers: int | None = None,
    cluster: str | None = None,
) -> dict[str, Any]:
    """Ingest a corpus file into a memory bank; returns the ingest report as a dict. ``workers``/``cluster``:
    embed on Dask (through the flow's DaskTaskRunner when it has one, else with dask.distributed directly).
    Each committed chunk is a line in the run's log; the run leaves ``ingest-BANK`` (a summary) and
    ``ingest-BANK-progress``."""
    pulse = run_pulse("ingest", bank_name_for(Path(path), memory))
    common = dict(chunk_size=chunk_size, batch_size=batch_size, fmt=fmt, field=field, errors=errors, device=device,
                  progress=progress, write=write_task, pulse=pulse)
    on_dask = type(FlowRunContext.get().task_runner).__name__ == "DaskTaskRunner"
    if (workers or cluster) and on_dask:
        spec = encoder_for(bank_name_for(Path(path), memory), encoder, store)
        remote = TaskEmbedder(spec, device, batch_size, window=2 * (workers or 2))
        report = run_ingest(path, memory, encoder, store, remote=remote, **common)
    else:
        report = run_ingest(path, memory, encoder, store, embed=embed_task, workers=workers, cluster=cluster,
                            **common)
    pulse.say(report.summary(), 1.0)
    ingest_summary(report.to_dict())
    return report.to_dict()


def dask_ingest_flow(workers: int | None = None, cluster: str | None = None) -> Flow:
    """:func:`ingest_flow` with a DaskTaskRunner: a local cluster of ``workers`` single-threaded processes, or the
    running cluster at ``cluster``."""
    from prefect_dask import DaskTaskRunner

    runner = (DaskTaskRunner(address=cluster) if cluster else
              DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                             "dashboard_address": None}))
    return ingest_flow.with_options(task_runner=runner)
