"""Embedding on a Dask cluster: chunks of sentences go to workers, vectors come back in order for ordered commits.

Each worker process loads the encoder once (``load_encoder`` caches per process) and embeds whole chunks; the
client reads the corpus, keeps ``window`` chunks in flight and writes results strictly in corpus order, one
commit per chunk, exactly like the single-process ingest. A worker that dies has its chunks re-run by the Dask
scheduler elsewhere; a client that dies loses only the chunks in flight, and running the ingest again embeds and
writes only what the bank does not hold yet.

    decapflow ingest corpus.txt --memory coco --workers 2            # a local cluster, one thread per worker
    decapflow ingest corpus.txt --memory coco --cluster tcp://scheduler:8786   # a running cluster

On a real cluster start one worker per GPU (``dask worker tcp://scheduler:8786 --nworkers 1 --nthreads 1``
on each GPU, ``CUDA_VISIBLE_DEVICES`` set) and give ``--device cuda``; the workers need decapflow installed and
the encoder's weights reachable (a shared cache, or online once).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

__all__ = ["DaskEmbedder", "embed_texts", "encoder_info", "ordered"]


def embed_texts(spec: str, device: str | None, texts: list[str], batch_size: int = 256,
                threads: int | None = 1) -> tuple[np.ndarray, int]:
    """On a worker: [n] texts -> ([n, dim] unit float32 vectors, how many were cut to the context length).
    ``threads``: the worker's CPU threads (one per single-threaded Dask worker), None for a fair share."""
    from decapflow import cpu
    from decapflow.encoders import load_encoder

    with cpu.claim(threads):  # counted by the other decapflow jobs on this machine
        encoder = load_encoder(spec, device)
        ids, truncated = encoder.tokenize(texts)
        return encoder.encode_tokens(ids, batch_size), truncated


def encoder_info(spec: str, device: str | None) -> tuple[str, int]:
    """On a worker: the encoder's normalised spec and its vector size (so the client need not load it)."""
    from decapflow.encoders import load_encoder

    encoder = load_encoder(spec, device)
    return encoder.spec.raw, encoder.dim


def ordered(chunks: Iterable[list[Any]], submit: Callable[[list[Any]], Any], window: int
            ) -> Iterator[tuple[list[Any], Any]]:
    """``(chunk, submit(chunk).result())`` in the order of ``chunks``, with at most ``window`` futures pending.
    ``submit`` returns anything with ``.result()`` (a Dask or Prefect future)."""
    pending: deque[tuple[list[Any], Any]] = deque()
    for chunk in chunks:
        pending.append((chunk, submit(chunk)))
        if len(pending) >= window:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


class DaskEmbedder:
    """A Dask client (to ``address``, or a local cluster of ``workers`` single-threaded processes) that embeds
    chunks with encoder ``spec`` on its workers."""

    def __init__(self, spec: str, device: str | None = None, *, address: str | None = None,
                 workers: int | None = None, batch_size: int = 256) -> None:
        from distributed import Client, LocalCluster

        if (address is None) == (workers is None):
            raise ValueError("give a cluster address or a number of local workers (one of them)")
        self.cluster = None
        if address is None:
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)
        else:
            self.client = Client(address)
        self.device, self.batch_size = device, batch_size
        self.spec, self.dim = self.client.submit(encoder_info, spec, device, pure=False).result()
        self.workers = max(1, len(self.client.scheduler_info()["workers"]))
        self.window = 2 * self.workers  # chunks in flight: every worker busy, the next one queued

    def submit(self, texts: list[str]) -> Any:
        return self.client.submit(embed_texts, self.spec, self.device, texts, self.batch_size, pure=False)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> DaskEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
