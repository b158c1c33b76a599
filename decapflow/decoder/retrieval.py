"""Nearest bank rows for a retrieval-fused decoder (:mod:`decapflow.decoder.fusion`): exact, batched matrix products
on the training device, with the caption itself (and, optionally, its near-copies) left out.

In training every caption retrieves its ``k`` nearest rows once per epoch: its embedding plus noise (the retrieval
noise, given as the expected cosine to the clean embedding, as ``noise_cos`` is) is the query, and the caption
itself is never among its own neighbours (IFCap's self-exclusion), nor any row closer to it than ``exclude_cos``
(paraphrases CLIP cannot tell apart would otherwise teach the decoder to copy a neighbour). The table of neighbour
ids ([rows, k], int32) is what an epoch caches: a batch gathers the neighbours' vectors from the bank copy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["nearest", "noise_std", "self_neighbours"]

#: Scores computed at once: queries x rows (floats), bounding the working memory to 256 MiB.
SCORE_BUDGET = 1 << 26
#: Extra candidates kept per query before leaving out the query itself and its near-copies.
SPARE = 32


def noise_std(cos: float | None, dim: int) -> float:
    """Per-dimension std of Gaussian noise that leaves a unit vector at cosine ``cos`` to itself (None or 1: no
    noise): ``sqrt((1/cos^2 - 1) / dim)`` (see ``decapflow.decoder.recipe.noise_std_for``)."""
    return 0.0 if cos is None or cos >= 1.0 else math.sqrt((1.0 / cos**2 - 1.0) / dim)


def _as_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)


@torch.no_grad()
def nearest(queries: np.ndarray, pool: np.ndarray, k: int, *, exclude: np.ndarray | None = None,
            clean: np.ndarray | None = None, exclude_cos: float | None = None,
            device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``pool`` [N, D] with the largest dot product with each query [Q, D]: (ids [Q, k] int64,
    scores [Q, k] float32), nearest first. ``exclude`` [Q]: a pool row each query may not return (itself);
    ``clean`` [Q, D] with ``exclude_cos``: also leave out rows whose cosine to the query's clean vector exceeds it
    (when that leaves fewer than ``k``, the closest of them fill the list, never the excluded row)."""
    device = torch.device(device)
    pool_t = _as_tensor(pool, device)
    n = pool_t.shape[0]
    if n == 0:
        raise ValueError("the pool is empty")
    k = min(k, n - (exclude is not None))
    take = min(n, k + (SPARE if exclude is not None or exclude_cos is not None else 0))
    chunk = max(1, SCORE_BUDGET // n)
    ids = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), chunk):
        q = _as_tensor(queries[start : start + chunk], device)
        s = q @ pool_t.T  # [c, N]
        if exclude is not None:
            rows = torch.arange(len(q), device=device)
            s[rows, torch.as_tensor(exclude[start : start + chunk], device=device)] = -math.inf
        top_s, top_i = s.topk(take, dim=1)
        if exclude_cos is not None and clean is not None:
            c = _as_tensor(clean[start : start + chunk], device)
            near = (pool_t[top_i] @ c.unsqueeze(2)).squeeze(2) > exclude_cos  # [c, take]
            order = torch.argsort(near.to(torch.int8), dim=1, stable=True)  # far ones first, each group in order
            top_s, top_i = top_s.gather(1, order), top_i.gather(1, order)
        ids[start : start + len(q)] = top_i[:, :k].cpu().numpy()
        scores[start : start + len(q)] = top_s[:, :k].float().cpu().numpy()
    return ids, scores


def self_neighbours(vectors: np.ndarray, k: int, *, noise_cos: float | None, exclude_cos: float | None,
                    seed: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Each row's ``k`` nearest other rows of ``vectors`` [N, D] (unit rows), retrieved with its own vector plus
    noise (``noise_cos``) as the query, never itself nor a row closer to it than ``exclude_cos``: [N, k] int32,
    nearest first. Seeded: the same ``seed`` gives the same table."""
    clean = np.asarray(vectors, dtype=np.float32)
    generator = torch.Generator().manual_seed(seed)
    std = noise_std(noise_cos, clean.shape[1])
    queries = clean
    if std > 0:
        noisy = torch.from_numpy(clean) + std * torch.randn(clean.shape, generator=generator)
        queries = F.normalize(noisy, dim=-1).numpy()
    ids, _ = nearest(queries, clean, k, exclude=np.arange(len(clean)), clean=clean, exclude_cos=exclude_cos,
                     device=device)
    return ids.astype(np.int32)
