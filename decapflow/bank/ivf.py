"""An IVF searched in-process over a bank's local vector copy (:meth:`VectorCache.vector_cache`): what ``topk`` and a
fused decoder's retrieval use on big banks.

LanceDB's IVF_FLAT index finds the same neighbours, but its engine spends ~0.8 ms on each query whatever the batch
(1.5-1.9 ms at 1M x 128 rows), so ``topk`` through it was only 3-4x faster than exact batched ``pd`` (6 ms/image).
Here the whole batch is routed with one matrix product, and the rows of every probed partition are scored with
one product per partition for all the queries of the batch that probe it, straight from memory-mapped rows: no
per-query engine cost.

The index, built once per bank version beside the copy it indexes (``<cache>/v<N>/ivf/``):

* ``centroids.npy`` [P, D] float32: spherical k-means (dot product of unit vectors, the centroid of a partition
  its normalised mean) trained on a seeded sample of ``SAMPLE_PER_PARTITION`` rows per partition; every row is then
  assigned to its nearest centroid, streamed in chunks (memory stays flat for any bank size);
* ``offsets.npy`` [P + 1] int64, ``ids.npy`` [N] int64: partition ``p`` holds sorted positions
  ``offsets[p]:offsets[p + 1]``, and ``ids[position]`` is the row of the local copy there;
* ``rows.npy`` (float32) or ``rows.bf16.npy`` (bfloat16 bits): the rows in that order, in the precision of the
  copy they came from, a second copy of the vectors (what LanceDB's IVF_FLAT also keeps), memory-mapped;
* ``meta.json``: partitions, rows, the k-means settings and where the centroids came from.

Files are written under a temporary name and renamed into place, so processes building at the same time each end
with a whole index (the last rename wins; the others find it and use it).

A new version of a bank may reuse the centroids of an earlier version (only the assignment and the sorting are
redone, ~half the build), while its rows are between half and twice the rows they were trained on.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from decapflow.bank.cache import PRECISIONS, cache_root
from decapflow.bank.rows import BF16Rows
from decapflow.cpu import blas_threads, usable_cpus
from decapflow.errors import BankError

__all__ = ["DEFAULT_NPROBES", "IvfIndex", "LocalIvf", "default_partitions", "train_centroids"]

FORMAT = 1
#: Partitions probed per query by default.
DEFAULT_NPROBES = 16
#: k-means rounds and sample rows per partition (the sample is seeded: the same bank gives the same index).
KMEANS_ROUNDS = 10
SAMPLE_PER_PARTITION = 64
#: Bytes of scores per chunk when assigning rows to centroids.
ASSIGN_CHUNK_BYTES = 64 << 20
#: Reuse an earlier version's centroids while the rows are within this factor of the rows they were trained on.
REUSE_FACTOR = 2.0
#: Partitions probed by at most this many queries of a batch are scored one query at a time (matrix-vector).
SMALL_GROUP = 2
ROWS_FILES = {"float32": "rows.npy", "bfloat16": "rows.bf16.npy"}


def default_partitions(rows: int) -> int:
    """Partitions for a bank of ``rows`` rows: ~sqrt(rows), at most rows / SAMPLE_PER_PARTITION, at least 1."""
    return max(1, min(int(rows**0.5), rows // SAMPLE_PER_PARTITION, 65_536))


def _float_rows(vectors: np.ndarray | BF16Rows, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``start:stop`` of a copy as float32 (a view of a float32 copy; bfloat16 widened, into ``out`` if given)."""
    if isinstance(vectors, BF16Rows):
        return BF16Rows.decode(vectors.bits[start:stop], None if out is None else out[: stop - start])
    return np.asarray(vectors[start:stop], dtype=np.float32)


def _nearest_centroid(vectors: np.ndarray | BF16Rows, centroids: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid by dot product, in chunks of rows: int32 [N]."""
    rows = len(vectors)
    chunk = max(1024, ASSIGN_CHUNK_BYTES // (4 * len(centroids)))
    out = np.empty(rows, np.int32)
    with blas_threads():
        for start in range(0, rows, chunk):
            block = _float_rows(vectors, start, min(rows, start + chunk))
            out[start : start + len(block)] = np.argmax(block @ centroids.T, axis=1)
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def train_centroids(vectors: np.ndarray | BF16Rows, partitions: int, rounds: int = KMEANS_ROUNDS,
                    sample_per_partition: int = SAMPLE_PER_PARTITION, seed: int = 0) -> np.ndarray:
    """Spherical k-means on a seeded sample of ``partitions * sample_per_partition`` rows: unit centroids [P, D].

    Starts from random sample rows; a partition left empty takes the sample row farthest from its centroid."""
    rows = len(vectors)
    if not 1 <= partitions <= rows:
        raise ValueError(f"partitions must lie in [1, {rows}], got {partitions}")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(rows, min(rows, partitions * sample_per_partition), replace=False))
    sample = np.asarray(vectors[picked], dtype=np.float32)  # [S, D]
    centroids = sample[rng.choice(len(sample), partitions, replace=False)].copy()
    with blas_threads():
        for _ in range(rounds):
            scores = sample @ centroids.T  # [S, P]
            nearest = np.argmax(scores, axis=1)
            fit = scores[np.arange(len(sample)), nearest]
            order = np.argsort(nearest, kind="stable")
            counts = np.bincount(nearest, minlength=partitions)
            filled = np.flatnonzero(counts)
            starts = np.concatenate([[0], np.cumsum(counts[filled])[:-1]])
            sums = np.add.reduceat(sample[order], starts, axis=0)  # [filled, D]
            centroids[filled] = _normalise(sums)
            empty = np.flatnonzero(counts == 0)
            if empty.size:  # the worst-fitting sample rows seed the empty partitions
                centroids[empty] = sample[np.argsort(fit)[: empty.size]]
    return centroids


class IvfIndex:
    """A loaded (memory-mapped) IVF: :meth:`search` it, :meth:`build` one, :meth:`load` one from a folder."""

    def __init__(self, centroids: np.ndarray, offsets: np.ndarray, ids: np.ndarray, rows: np.ndarray | BF16Rows,
                 meta: dict[str, Any]) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.ids = ids
        self.rows = rows
        self.meta = meta
        self.sizes = np.diff(self.offsets)
        self._offsets = self.offsets.tolist()  # Python ints: indexing them in the scoring loop is cheapest
        self._rows = rows.bits if isinstance(rows, BF16Rows) else np.asarray(rows)  # plain views: cheap slices
        self.partitions = len(self.centroids)
        self.dim = self.centroids.shape[1]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    # ------------------------------------------------------------------ build, save, load
    @classmethod
    def write(cls, folder: Path, vectors: np.ndarray | BF16Rows, precision: str, partitions: int | None = None,
              centroids: np.ndarray | None = None, seed: int = 0, meta: dict[str, Any] | None = None) -> IvfIndex:
        """Build the index of ``vectors`` (the local copy, float32 or :class:`BF16Rows`) into ``folder``, which must
        not exist yet (write into a temporary folder and rename it). ``centroids``: reuse these (only assign)."""
        rows = len(vectors)
        if rows == 0:
            raise BankError("cannot index an empty bank")
        started = time.perf_counter()
        info: dict[str, Any] = {"format": FORMAT, "rows": rows, "dim": int(vectors.shape[1]), "seed": seed,
                                "rounds": KMEANS_ROUNDS, "sample_per_partition": SAMPLE_PER_PARTITION, **(meta or {})}
        if centroids is None:
            centroids = train_centroids(vectors, partitions or default_partitions(rows), seed=seed)
            info["trained_rows"] = rows
        info["partitions"] = len(centroids)
        info["train_s"] = round(time.perf_counter() - started, 2)
        nearest = _nearest_centroid(vectors, centroids)
        info["assign_s"] = round(time.perf_counter() - started - info["train_s"], 2)
        order = np.argsort(nearest, kind="stable").astype(np.int64)  # within a partition, rows stay in order
        offsets = np.concatenate([[0], np.cumsum(np.bincount(nearest, minlength=len(centroids)))]).astype(np.int64)
        del nearest
        folder.mkdir(parents=True)
        np.save(folder / "centroids.npy", centroids.astype(np.float32))
        np.save(folder / "offsets.npy", offsets)
        np.save(folder / "ids.npy", order)
        write_sorted_rows(folder / ROWS_FILES[precision], vectors, order)
        info["seconds"] = round(time.perf_counter() - started, 2)
        (folder / "meta.json").write_text(json.dumps(info, indent=1))
        return cls.load(folder, precision)

    @classmethod
    def load(cls, folder: Path, precision: str = "float32") -> IvfIndex:
        """The index in ``folder``, memory-mapped, reading the rows in ``precision`` (its file must exist)."""
        meta = json.loads((folder / "meta.json").read_text())
        rows = np.load(folder / ROWS_FILES[precision], mmap_mode="r")
        return cls(np.load(folder / "centroids.npy"), np.load(folder / "offsets.npy"),
                   np.load(folder / "ids.npy", mmap_mode="r"), BF16Rows(rows) if precision == "bfloat16" else rows,
                   meta)

    # ------------------------------------------------------------------ search
    def probes(self, queries: np.ndarray, nprobes: int) -> np.ndarray:
        """The ``nprobes`` partitions each query probes, nearest centroid first: int64 [B, nprobes]."""
        with blas_threads():
            scores = queries @ self.centroids.T  # [B, P]
        if nprobes >= self.partitions:
            picked = np.broadcast_to(np.arange(self.partitions), scores.shape)
        else:
            picked = np.argpartition(scores, self.partitions - nprobes, axis=1)[:, -nprobes:]
        order = np.argsort(-np.take_along_axis(scores, picked, 1), axis=1)
        return np.take_along_axis(picked, order, 1).astype(np.int64)

    def search(self, queries: np.ndarray, k: int, nprobes: int | None = None, threads: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows of the probed partitions nearest to each query by dot product, nearest first:
        (ids [B, k] int64 rows of the local copy, scores [B, k] float32). When the probed partitions hold fewer
        than ``k`` rows the rest is padded with id -1 and score -inf.

        The batch is scored partition by partition: each probed partition's rows meet every query that probes it
        in one matrix product, written into a [B, candidates] score buffer, then one ``argpartition`` per batch.
        ``threads`` (default: torch's count, which :mod:`decapflow.cpu` sizes) split the partitions between them,
        each running single-threaded BLAS."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [B, {self.dim}], got {q.shape}")
        batch = len(q)
        probes = self.probes(q, max(1, min(nprobes or DEFAULT_NPROBES, self.partitions)))  # [B, n]
        sizes = self.sizes[probes]  # [B, n]
        starts = np.cumsum(sizes, axis=1) - sizes  # where each probed partition's scores go in its query's row
        width = max(1, int(sizes.sum(axis=1).max()))
        scores = np.full((batch, width), -np.inf, dtype=np.float32)
        self._score(q, probes, starts, scores, threads)
        kept = min(k, width)
        top = np.argpartition(scores, width - kept, axis=1)[:, width - kept :]  # [B, kept] positions, unordered
        values = np.take_along_axis(scores, top, 1)
        order = np.argsort(-values, axis=1, kind="stable")
        top, values = np.take_along_axis(top, order, 1), np.take_along_axis(values, order, 1)
        segment = (starts[:, None, :] <= top[:, :, None]).sum(axis=2) - 1  # [B, kept] which probe each came from
        position = (self.offsets[np.take_along_axis(probes, segment, 1)] + top
                    - np.take_along_axis(starts, segment, 1))
        found = np.isfinite(values)
        ids = np.full((batch, k), -1, dtype=np.int64)
        out = np.full((batch, k), -np.inf, dtype=np.float32)
        ids[:, :kept] = np.where(found, self.ids[np.where(found, position, 0)], -1)
        out[:, :kept] = values
        return ids, out

    def _score(self, q: np.ndarray, probes: np.ndarray, starts: np.ndarray, scores: np.ndarray,
               threads: int | None) -> None:
        """Fill ``scores`` [B, width]: query b's probe j writes its partition's dot products at starts[b, j]."""
        n = probes.shape[1]
        flat = probes.reshape(-1)
        order = np.argsort(flat, kind="stable")  # the (query, probe) pairs grouped by partition
        parts = flat[order]
        bounds = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1], True])
        pairs = (order // n, starts.reshape(-1)[order])  # each pair's query and where its scores go
        group_parts = parts[bounds[:-1]]
        cost = self.sizes[group_parts] * (1 + np.diff(bounds) / 8)  # bytes read, and a little per query
        groups = np.stack([group_parts, bounds[:-1], bounds[1:]], axis=1)[self.sizes[group_parts] > 0]
        cost = cost[self.sizes[group_parts] > 0]
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        threads = max(1, min(threads, len(groups)))
        with blas_threads(1):
            if threads == 1:
                self._score_groups(q, groups.tolist(), pairs, scores)
                return
            # the partitions in turns of similar cost, largest first, each to the least loaded thread
            shares: list[list] = [[] for _ in range(threads)]
            load = np.zeros(threads)
            for i in np.argsort(-cost, kind="stable").tolist():
                t = int(np.argmin(load))
                shares[t].append(groups[i].tolist())
                load[t] += cost[i]
            list(_pool().map(lambda share: self._score_groups(q, share, pairs, scores), shares))

    def _score_groups(self, q: np.ndarray, groups: list[list[int]], pairs: tuple[np.ndarray, np.ndarray],
                      scores: np.ndarray) -> None:
        """Score the partitions ``groups`` ([partition, first pair, end pair] each) for the queries that probe them."""
        offsets, (which, at) = self._offsets, pairs
        rows_all, bf16 = self._rows, isinstance(self.rows, BF16Rows)
        buffer = np.empty((int(self.sizes.max()), self.dim), np.float32) if bf16 else None
        for p, lo, hi in groups:
            start, stop = offsets[p], offsets[p + 1]
            size = stop - start
            rows = BF16Rows.decode(rows_all[start:stop], buffer[:size]) if bf16 else rows_all[start:stop]
            if hi - lo <= SMALL_GROUP:  # one matrix-vector product per query: the rows stay in cache between them
                for b, s in zip(which[lo:hi].tolist(), at[lo:hi].tolist(), strict=True):
                    np.dot(rows, q[b], out=scores[b, s : s + size])
            else:
                block = q[which[lo:hi]] @ rows.T  # [g, size]
                for j, (b, s) in enumerate(zip(which[lo:hi].tolist(), at[lo:hi].tolist(), strict=True)):
                    scores[b, s : s + size] = block[j]


def write_sorted_rows(path: Path, vectors: np.ndarray | BF16Rows, order: np.ndarray, chunk: int = 65_536) -> None:
    """Write ``vectors[order]`` to ``path`` (.npy; float32, or bfloat16 bits for a :class:`BF16Rows` copy) through a
    temporary file renamed into place, chunk by chunk."""
    source = vectors.bits if isinstance(vectors, BF16Rows) else vectors
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=source.dtype, shape=source.shape)
    for start in range(0, len(order), chunk):
        out[start : start + chunk] = source[order[start : start + chunk]]
    out.flush()
    del out
    tmp.replace(path)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=usable_cpus(), thread_name_prefix="decapflow-ivf")
        return _POOL


# ---------------------------------------------------------------------------------------------- per bank
_LOADED: dict[tuple[str, str], tuple[int, IvfIndex]] = {}
_BUILDING: dict[str, threading.Lock] = {}


class LocalIvf:
    """The in-process IVF of ``self``'s current version: a mixin of :class:`~decapflow.bank.memory.MemoryBank`,
    which provides ``name``, ``bank_id``, ``version``, ``dim``, ``len()`` and ``vector_cache()``."""

    name: str
    bank_id: str
    version: int
    dim: int

    def ivf_folder(self, version: int | None = None) -> Path:
        return cache_root(self.name, self.bank_id) / f"v{self.version if version is None else version}" / "ivf"

    def has_ivf(self, precision: str = "float32") -> bool:
        """Whether this version's IVF is built with its rows in ``precision``."""
        folder = self.ivf_folder()
        return (folder / "meta.json").exists() and (folder / ROWS_FILES[precision]).exists()

    def ivf(self, precision: str = "float32", build: bool = True) -> IvfIndex | None:
        """This version's IVF over the ``precision`` copy (loaded once per process, memory-mapped), built first when
        missing and ``build`` (else None)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        folder = self.ivf_folder()
        key = (str(folder), precision)
        try:
            stamp = (folder / "meta.json").stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        loaded = _LOADED.get(key)
        if loaded is not None and loaded[0] == stamp:
            return loaded[1]
        if not self.has_ivf(precision):
            if not build:
                return None
            return self.build_ivf(precision)
        index = IvfIndex.load(folder, precision)
        _LOADED[key] = (stamp, index)
        return index

    def build_ivf(self, precision: str = "float32", partitions: int | None = None, reuse: bool = True,
                  rebuild: bool = False) -> IvfIndex:
        """Build this version's IVF (see the module docstring) unless it is there already (``rebuild``: replace it).

        ``reuse``: take the centroids of the newest earlier version's IVF of this bank when this version's rows are
        within REUSE_FACTOR of the rows they were trained on (and ``partitions`` is not given): only the
        assignment is redone. When the IVF exists with its rows in another precision, only the rows are written."""
        folder = self.ivf_folder()
        lock = _BUILDING.setdefault(str(folder), threading.Lock())
        with lock:
            if not rebuild and self.has_ivf(precision):
                return self.ivf(precision, build=False)
            vectors, _ = self.vector_cache(precision)
            if not rebuild and (folder / "meta.json").exists():  # built in the other precision: add these rows
                write_sorted_rows(folder / ROWS_FILES[precision], vectors, np.load(folder / "ids.npy", mmap_mode="r"))
                return self.ivf(precision, build=False)
            centroids, meta = (self._earlier_centroids() if reuse and partitions is None else (None, {}))
            meta.update(bank=self.name, version=self.version)
            tmp = folder.with_name(f".tmp-ivf-{uuid.uuid4().hex}")
            try:
                IvfIndex.write(tmp, vectors, precision, partitions, centroids, meta=meta)
                _install(tmp, folder, replace=rebuild)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return self.ivf(precision, build=False)

    def _earlier_centroids(self) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The centroids of the newest earlier version's IVF that may serve this version (see build_ivf)."""
        rows = len(self)
        root = cache_root(self.name, self.bank_id)
        versions = sorted((int(p.name[1:]) for p in root.glob("v*") if p.name[1:].isdigit()), reverse=True)
        for version in versions:
            if version >= self.version:
                continue
            folder = self.ivf_folder(version)
            try:
                meta = json.loads((folder / "meta.json").read_text())
                centroids = np.load(folder / "centroids.npy")
            except (OSError, ValueError):
                continue
            trained = meta.get("trained_rows", meta.get("rows", 0))
            if centroids.shape[1] == self.dim and trained and 1 / REUSE_FACTOR <= rows / trained <= REUSE_FACTOR:
                return centroids, {"trained_rows": trained,
                                   "centroids_from_version": meta.get("centroids_from_version", version)}
            return None, {}
        return None, {}


def _install(tmp: Path, folder: Path, replace: bool) -> None:
    """Rename the built ``tmp`` folder to ``folder``; when another process got there first keep its index (or, with
    ``replace``, move it aside and remove it)."""
    if replace and folder.exists():
        old = folder.with_name(f".old-ivf-{uuid.uuid4().hex}")
        try:
            folder.rename(old)
        except FileNotFoundError:
            old = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "meta.json").exists():
            raise
