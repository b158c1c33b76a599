"""From image embeddings to decoder prefixes: DeCap's inference strategies as pure functions.

An image embedding ``v`` (CLIP image tower, unit length) does not look like the text embeddings the decoder
was trained on (the "modality gap"). DeCap closes the gap by expressing ``v`` as a mixture of the text
embeddings in a memory bank ``M`` [N, D] (unit rows)::

    w = softmax(M @ v / tau)          # [N]  tau = 0.01: a sharp attention over the bank
    v_proj = normalize(w @ M)         # [D]  lies in the span of real caption embeddings

The strategies a captioner can pick (``STRATEGIES``):

==========  ==========================================================================================
``pd``      projection onto the whole bank, exact (:func:`project`)
``topk``    projection onto each query's k nearest bank rows found by an ANN index (:func:`project_subset`)
``nnd``     nearest-neighbour decoding: the single closest bank vector (:func:`nearest`, then ``M[ids[:, 0]]``)
``vd``      visual decoding: the raw image embedding, re-normalised (:func:`identity`)
``clipre``  CLIP retrieval: no decoding at all, the caller returns the bank *text* at ``nearest(...)[0][:, 0]``
``ms``      mean-shift gap correction, ``normalize(v - mu_img + mu_txt)`` (:mod:`decapflow.caption.modality`)
``rerank``  candidates (pd, nnd, ms, blends) decoded and re-ranked by CLIP text-image similarity (modality)
``fused``   a retrieval-fused decoder reads the image's nearest bank rows beside its query token (caption.fused)
==========  ==========================================================================================

Everything here is a pure function of arrays. Banks may be huge (millions of rows, a read-only
``np.memmap``, float16 on disk), so :func:`project` and :func:`nearest` stream over the bank in chunks of
rows and never hold a [B, N] matrix: the softmax is computed online, the way flash-attention does it
(keep a running max ``m``, a running sum ``l`` of ``exp(s - m)`` and a running weighted sum ``acc``; when a
chunk raises the max, rescale ``l`` and ``acc`` by ``exp(m_old - m_new)``). The result is the same as the dense
formula up to float32 rounding, for any chunk size and any tau (no overflow even at tau = 0.001).

Computation is float32 numpy on CPU (float16 matrix products are 10-100x slower on CPUs, so a float16 bank
is converted chunk by chunk). A big bank can be read from a bfloat16 copy (:class:`BF16Rows`: half the bytes of
float32, same exponent range, ~3 significant digits); each chunk is widened to float32 in cache, so results differ
from the float32 bank only by the rounding of the stored rows (cosine of the projections > 0.9999, measured in
``benchmarks/big_bank.py``). numpy rather than torch because, measured on the dev machine (AMD EPYC, torch's
MKL), the same algorithm with numpy's OpenBLAS runs the one-query case ~1.5x faster and the 64-query case
about as fast (``benchmarks/projection.py --torch-chunked``). The BLAS thread count follows torch's setting
(``torch.set_num_threads``, which :mod:`decapflow.cpu` sizes) for the duration of each call (threadpoolctl);
no thread pool of our own is started. Inputs may be numpy arrays, memmaps or torch tensors (moved to CPU);
outputs are numpy (``torch.from_numpy`` on them is free).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from decapflow.bank.rows import BF16Rows
from decapflow.cpu import blas_threads

STRATEGIES: tuple[str, ...] = ("pd", "topk", "nnd", "vd", "clipre", "ms", "rerank", "fused")

#: Bytes of float32 bank rows per chunk: 1 MiB (512 rows of 512 dims) stays in a core's L2 cache between
#: the two passes over a chunk (scores, then the weighted sum). Best of 128..8192 rows on the dev machine
#: (``benchmarks/projection.py --sweep``); 256..4096 are within ~15%.
DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass
class Projection:
    """The result of projecting B queries onto a bank.

    ``vectors``: [B, D] float32 unit rows, the decoder prefixes.
    ``support_ids``: [B, s] int64 bank rows with the largest weights, heaviest first (what the projection
    leaned on; look up their text to explain a caption). ``support_weights``: [B, s] float32 their softmax
    weights (they sum to at most 1). Unused slots (fewer than s candidates) hold id -1 and weight 0.
    """

    vectors: np.ndarray
    support_ids: np.ndarray
    support_weights: np.ndarray


# ----------------------------------------------------------------------------------------------- helpers


def _numpy(x) -> np.ndarray:
    """A numpy view of an array-like; torch tensors are detached and moved to CPU (a :class:`BF16Rows` passes)."""
    if isinstance(x, BF16Rows):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def _queries(V) -> np.ndarray:
    """Queries as a C-contiguous float32 [B, D] array (a single [D] vector becomes [1, D])."""
    q = np.ascontiguousarray(_numpy(V), dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[0] == 0:
        raise ValueError(f"queries must be a [B, D] array with B >= 1, got shape {q.shape}")
    if not np.isfinite(q).all():
        raise ValueError("queries contain NaN or infinite values")
    return q


def _bank(M, dim: int) -> np.ndarray:
    bank = _numpy(M)
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"bank must be a non-empty [N, D] array, got shape {bank.shape}")
    if bank.shape[1] != dim:
        raise ValueError(f"bank vectors have {bank.shape[1]} dims but queries have {dim}: different encoders?")
    return bank


def _chunk_rows(chunk_rows: int | None, dim: int) -> int:
    if chunk_rows is None:
        return max(64, DEFAULT_CHUNK_BYTES // (4 * dim))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return int(chunk_rows)


def _chunks(M: np.ndarray | BF16Rows, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, chunk)``: float32 [c, D] row blocks, views when possible (float16 is converted; bfloat16
    is widened into one reused buffer, so the chunk is only valid until the next one)."""
    if isinstance(M, BF16Rows):
        buffer = np.empty((rows, M.shape[1]), np.float32)
        for start in range(0, M.shape[0], rows):
            bits = M.bits[start : start + rows]
            yield start, BF16Rows.decode(bits, buffer[: len(bits)])
        return
    for start in range(0, M.shape[0], rows):
        yield start, np.ascontiguousarray(M[start : start + rows], dtype=np.float32)


def _scores(q: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """[B, D] x [c, D] -> [B, c]; one query goes through a matrix-vector product (BLAS gemv is faster)."""
    return (chunk @ q[0])[None] if len(q) == 1 else q @ chunk.T


def _weighted_sum(weights: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """[B, c] x [c, D] -> [B, D]."""
    return (weights[0] @ chunk)[None] if len(weights) == 1 else weights @ chunk


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class _TopK:
    """Running top-k (largest values, sorted descending) per query over a stream of score chunks."""

    def __init__(self, batch: int, k: int):
        self.k = k
        self.values = np.full((batch, k), -np.inf, dtype=np.float32)  # [B, k]
        self.ids = np.full((batch, k), -1, dtype=np.int64)  # [B, k]

    def update(self, scores: np.ndarray, start: int, chunk_max: np.ndarray) -> None:
        """Merge a [B, c] chunk whose column 0 is bank row ``start``; ``chunk_max`` [B] is its row-wise max.

        Queries whose chunk max does not beat their current k-th value are skipped: after the first chunks
        this is most of them, which keeps tracking nearly free."""
        rows = np.flatnonzero(chunk_max > self.values[:, -1])
        if rows.size == 0:
            return
        sub = scores[rows]  # [r, c]
        k = min(self.k, sub.shape[1])
        local = np.argpartition(sub, sub.shape[1] - k, axis=1)[:, -k:]  # [r, k] unordered
        merged_values = np.concatenate([self.values[rows], np.take_along_axis(sub, local, 1)], axis=1)
        merged_ids = np.concatenate([self.ids[rows], local + start], axis=1)
        order = np.argsort(-merged_values, axis=1, kind="stable")[:, : self.k]
        self.values[rows] = np.take_along_axis(merged_values, order, 1)
        self.ids[rows] = np.take_along_axis(merged_ids, order, 1)


# ------------------------------------------------------------------------------------------ strategies


def project(V, M, tau: float = 0.01, chunk_rows: int | None = None, n_support: int = 5) -> Projection:
    """DeCap projection of B queries onto the whole bank, exact, streaming over the bank's rows.

    ``V``: [B, D] (or [D]) unit query vectors. ``M``: [N, D] unit bank rows (array, read-only memmap or
    tensor; float32 or float16). ``tau``: softmax temperature (the paper uses 0.01). ``chunk_rows``: bank rows
    per step (default ~1 MiB of float32). ``n_support``: how many of the heaviest bank rows to report.

    Memory is O(B * (chunk_rows + D)) beyond the inputs; the bank is read once. Equal to
    ``normalize(softmax(V @ M.T / tau) @ M)`` up to float32 rounding.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    q = _queries(V)  # [B, D]
    bank = _bank(M, q.shape[1])
    batch, dim = q.shape
    q_scaled = q / np.float32(tau)  # logits come out of the product already divided by tau
    running_max = np.full((batch, 1), -np.inf, dtype=np.float32)  # [B, 1]  m
    running_sum = np.zeros((batch, 1), dtype=np.float32)  # [B, 1]  l = sum exp(s - m)
    acc = np.zeros((batch, dim), dtype=np.float32)  # [B, D]  sum exp(s - m) * row
    top = _TopK(batch, max(1, n_support))
    with blas_threads():
        for start, chunk in _chunks(bank, _chunk_rows(chunk_rows, dim)):
            logits = _scores(q_scaled, chunk)  # [B, c]
            chunk_max = logits.max(axis=1, keepdims=True)  # [B, 1]
            top.update(logits, start, chunk_max[:, 0])
            new_max = np.maximum(running_max, chunk_max)
            rescale = np.exp(running_max - new_max)  # [B, 1]; exp(-inf) = 0 on the first chunk
            logits -= new_max
            weights = np.exp(logits, out=logits)  # [B, c] in place; exp(s - m_new) <= 1, never overflows
            running_sum *= rescale
            running_sum += weights.sum(axis=1, keepdims=True)
            acc *= rescale
            acc += _weighted_sum(weights, chunk)
            running_max = new_max
    support_weights = np.exp(top.values - running_max) / running_sum  # [B, s]; empty slots: exp(-inf) = 0
    return Projection(_normalize(acc), top.ids[:, :n_support], support_weights[:, :n_support])


def gather_neighbors(M, neighbor_ids) -> np.ndarray:
    """Bank rows for each query's neighbour list: ``M`` [N, D], ``neighbor_ids`` [B, k] -> [B, k, D] float32.

    Negative ids (padding, when an index returned fewer than k hits) give zero rows. Rows are read in
    sorted order, once each, which is kind to a memory-mapped bank.
    """
    bank = _numpy(M)
    ids = np.asarray(_numpy(neighbor_ids), dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"neighbor_ids must be [B, k], got shape {ids.shape}")
    if ids.size and ids.max() >= bank.shape[0]:
        raise ValueError(f"neighbor id {int(ids.max())} out of range for a bank of {bank.shape[0]} rows")
    safe = np.where(ids < 0, 0, ids)
    unique = np.unique(safe)  # sorted
    rows = np.asarray(bank[unique], dtype=np.float32)  # [u, D]
    out = rows[np.searchsorted(unique, safe)]  # [B, k, D]
    out[ids < 0] = 0.0
    return out


def project_subset(V, neighbors, tau: float = 0.01, neighbor_ids=None, n_support: int = 5) -> Projection:
    """Projection of each query onto its own k neighbours (the ``topk`` strategy over an ANN index).

    Either ``neighbors`` is [B, k, D] (the neighbour vectors, already gathered), or ``neighbors`` is the
    whole bank [N, D] and ``neighbor_ids`` [B, k] says which rows belong to each query. With ids,
    ``support_ids`` are bank row ids and negative ids mark padding (ignored); without, they are positions
    0..k-1 in each query's list. Equals :func:`project` when every query's neighbours are the whole bank.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    q = _queries(V)  # [B, D]
    if neighbor_ids is not None:
        ids = np.asarray(_numpy(neighbor_ids), dtype=np.int64)  # [B, k]
        vecs = gather_neighbors(neighbors, ids)  # [B, k, D]
    else:
        vecs = np.asarray(_numpy(neighbors), dtype=np.float32)
        if vecs.ndim != 3:
            raise ValueError(f"neighbors must be [B, k, D] (or a bank plus neighbor_ids), got {vecs.shape}")
        ids = np.broadcast_to(np.arange(vecs.shape[1]), vecs.shape[:2])
    if vecs.shape[0] != q.shape[0] or vecs.shape[2] != q.shape[1]:
        raise ValueError(f"neighbours {vecs.shape} do not match queries {q.shape}")
    valid = ids >= 0  # [B, k]
    if not valid.any(axis=1).all():
        raise ValueError("some query has no neighbours (all its ids are negative)")
    with blas_threads():
        logits = np.matmul(vecs, q[:, :, None])[:, :, 0] / np.float32(tau)  # [B, k]
        logits[~valid] = -np.inf
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)  # [B, k]
        vectors = _normalize(np.matmul(weights[:, None, :], vecs)[:, 0])  # [B, D]
    order = np.argsort(-weights, axis=1, kind="stable")[:, :n_support]  # [B, s]
    support_ids = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(ids, order, 1), -1)
    return Projection(vectors.astype(np.float32), support_ids, np.take_along_axis(weights, order, 1))


def nearest(V, M, k: int = 1, chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest bank rows by cosine (dot product of unit vectors), streaming over the bank.

    Returns ``(ids [B, k] int64, sims [B, k] float32)``, most similar first. ``nnd`` decodes ``M[ids[:, 0]]``;
    ``clipre`` returns the bank text of ``ids[:, 0]``. ``k`` larger than the bank is clipped to N.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = _queries(V)
    bank = _bank(M, q.shape[1])
    top = _TopK(q.shape[0], min(k, bank.shape[0]))
    with blas_threads():
        for start, chunk in _chunks(bank, _chunk_rows(chunk_rows, q.shape[1])):
            sims = _scores(q, chunk)  # [B, c]
            top.update(sims, start, sims.max(axis=1))
    return top.ids, top.values


def identity(V) -> np.ndarray:
    """Visual decoding (``vd``): the image embedding itself, re-normalised, as a [B, D] float32 prefix."""
    return _normalize(_queries(V))
