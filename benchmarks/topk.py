"""The ``topk`` strategy over a LanceDB IVF_PQ index against the exact projection (issue 4), same run.

A real memory bank of ``--rows`` clustered synthetic unit vectors (``--centres`` random centres, each row a
centre plus noise at cosine ~0.8, renormalised, like caption embeddings) is written with ``MemoryBank.add`` in
chunks (texts ``"row {i}"``, so a hit's text names its row), then ``bank.build_index()`` builds the IVF_PQ index
(timed). ``--queries`` noise queries, the stress case (a fresh text-like vector near a random centre, drowned in noise to
cosine ~0.3 with the bank: the modality gap) are projected two ways, with tau 0.01:

* ``exact``: :func:`decapflow.caption.projection.project` over ``bank.vector_cache()`` (the ``pd`` strategy), all
  queries in one call (as ``Captioner`` does with a batch), and one query per call (``exact_b1``).
  Two kinds of queries (``--query-kinds``): ``noise`` as above (its nearest rows are noise-aligned rows from
  everywhere; real CLIP image queries route almost like text ones: ``benchmarks/big_world.py``), and ``text``: a
  fresh row of a random cluster (cosine ~0.8 to its centre, as a caption's own embedding would be).
* ``topk``: what ``Captioner`` does on a large bank: ``bank.ann_neighbors(queries, k)`` then
  :func:`decapflow.caption.projection.project_subset` on the returned neighbour vectors, for each k.

Per k it prints ms/query of both, the speed-up, cos(v_proj_topk, v_proj_exact) mean and min, the recall of the
ANN neighbours against the exact top-k (:func:`decapflow.caption.projection.nearest`) and the share of the exact
softmax mass those exact top-k rows hold. Output: JSON lines; ratios, never assertions.

    .venv/bin/python benchmarks/topk.py --quick                    # 30k rows (under a minute)
    .venv/bin/python benchmarks/topk.py --rows 100000              # ~2 minutes, most of it the index build
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/topk.py          # 1M rows: ~4 GB of disk, index build minutes

``--nprobes`` / ``--refine`` take several values to sweep the index's search settings (library defaults:
nprobes 50, refine 10). Run on a quiet machine; one torch/BLAS thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


#: Quick mode's bank: LanceDB's IVF_PQ build alone takes ~30 s (PQ training) to ~90 s at 100k rows here.
QUICK_ROWS = 30_000


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered_rows(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n, D] unit rows: a random centre plus Gaussian noise (cosine ~0.8 to the centre), renormalised."""
    dim = centres.shape[1]
    which = rng.integers(0, len(centres), n)
    return unit_rows(centres[which] + rng.standard_normal((n, dim), dtype=np.float32) * (0.75 / np.sqrt(dim)))


def noise_queries(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n, D] unit queries: a fresh text-like row near a random centre plus strong isotropic noise (cosine ~0.3).
    A stress case for ANN, not a model of CLIP images: their nearest rows are whichever rows the noise aligns with."""
    text = clustered_rows(n, centres, rng)
    return unit_rows(text + 3.2 * rng.standard_normal(text.shape, dtype=np.float32) / np.sqrt(centres.shape[1]))


def write_bank(rows: int, centres: np.ndarray, rng: np.random.Generator, chunk: int):
    """A memory bank ``bench`` (current ``DECAPFLOW_HOME``) of ``rows`` clustered vectors, one commit per chunk."""
    from decapflow.bank.memory import Registry

    bank = Registry().create("bench", "synthetic", centres.shape[1])
    now = datetime.now(timezone.utc)
    for start in range(0, rows, chunk):
        ids = range(start, min(rows, start + chunk))
        bank.add([f"h{i}" for i in ids], [f"row {i}" for i in ids], clustered_rows(len(ids), centres, rng),
                 "synthetic", now)
    return bank


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def topk_projection(bank, queries: np.ndarray, k: int, tau: float, nprobes: int, refine: int):
    """``Captioner``'s topk path (``Captioner._topk``): ANN neighbours (vectors + texts), padding masked out,
    then projection onto each query's own neighbours. Returns (projection, bank row ids [B, k])."""
    from decapflow.caption.projection import project_subset

    vectors, texts = bank.ann_neighbors(queries, k, nprobes=nprobes, refine_factor=refine)  # [B, k, D], [B][k]
    batch, k, dim = vectors.shape
    ids = np.arange(batch * k).reshape(batch, k)
    ids[np.array([[t == "" for t in row] for row in texts])] = -1  # padding when the index found < k
    sub = project_subset(queries, vectors.reshape(-1, dim), tau=tau, neighbor_ids=ids)
    return sub, np.array([[int(t[4:]) if t else -1 for t in row] for row in texts])  # "row {i}" -> i


def compare(args: argparse.Namespace, bank, M: np.ndarray, queries: np.ndarray, kind: str) -> None:
    """Time exact vs topk for each k and index setting; print accuracy against the exact projection."""
    from decapflow.caption.projection import nearest, project

    exact, exact_s = timed(lambda: project(queries, M, args.tau, n_support=max(args.k)))
    b1 = queries[: args.b1_queries]
    _, b1_s = timed(lambda: [project(q[None], M, args.tau) for q in b1])
    true_ids, sims = nearest(queries, M, k=max(args.k))
    exact_ms, exact_b1_ms = exact_s / len(queries) * 1e3, b1_s / len(b1) * 1e3
    emit({"queries": kind, "n": len(queries), "exact_ms_per_query": round(exact_ms, 2),
          "exact_b1_ms_per_query": round(exact_b1_ms, 2), "best_cosine_mean": round(float(sims[:, 0].mean()), 3),
          "top1_weight_mean": round(float(exact.support_weights[:, 0].mean()), 4)})
    for nprobes in args.nprobes:
        for refine in args.refine:
            for k in args.k:
                (sub, ids), seconds = timed(lambda k=k, n=nprobes, r=refine: topk_projection(bank, queries, k,
                                                                                              args.tau, n, r))
                cos = (sub.vectors * exact.vectors).sum(axis=1)
                recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, true_ids[:, :k], strict=True)])
                mass = exact.support_weights[:, :k].sum(axis=1)  # softmax mass of the exact top-k rows
                ms = seconds / len(queries) * 1e3
                emit({"queries": kind, "k": k, "nprobes": nprobes, "refine": refine,
                      "topk_ms_per_query": round(ms, 2), "exact_ms_per_query": round(exact_ms, 2),
                      "speedup": round(exact_ms / ms, 2), "speedup_vs_exact_b1": round(exact_b1_ms / ms, 2),
                      "cos_mean": round(float(cos.mean()), 5), "cos_min": round(float(cos.min()), 5),
                      "recall_at_k": round(float(recall), 4), "exact_topk_mass_mean": round(float(mass.mean()), 4)})


QUERY_KINDS = {"noise": noise_queries, "text": clustered_rows}


def run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)  # projection's BLAS follows torch's thread count
    rng = np.random.default_rng(args.seed)
    centres = unit_rows(rng.standard_normal((args.centres, args.dim), dtype=np.float32))
    partitions = args.partitions or max(16, min(4096, int(args.rows**0.5)))  # what build_index picks
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        os.environ["DECAPFLOW_HOME"] = tmp
        bank, write_s = timed(lambda: write_bank(args.rows, centres, rng, args.chunk))
        _, index_s = timed(lambda: bank.build_index(args.partitions, args.sub_vectors))
        (M, texts), cache_s = timed(bank.vector_cache)
        if texts[len(texts) - 1].as_py() != f"row {len(texts) - 1}":
            raise RuntimeError("the vector cache is not in insertion order: ANN ids would not match its rows")
        np.asarray(M).sum(dtype=np.float64)  # touch every page once: exact timings see a warm page cache
        probe = np.array(M[:1])
        _, first_s = timed(lambda: bank.ann_neighbors(probe, 1))  # the first search opens the index
        emit({"setup": {"rows": len(bank), "dim": args.dim, "centres": args.centres, "write_s": round(write_s, 1),
                        "build_index_s": round(index_s, 1), "partitions": partitions,
                        "partitions_trained": min(partitions, args.rows // 256),  # LanceDB samples 256 per partition
                        "sub_vectors": args.sub_vectors or args.dim // 16, "vector_cache_s": round(cache_s, 1),
                        "first_ann_query_ms": round(first_s * 1e3, 1), "threads": torch.get_num_threads(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "tau": args.tau,
                        "targets": "speedup >= 10, cos >= 0.99"}})
        for kind in args.query_kinds:
            compare(args, bank, M, QUERY_KINDS[kind](args.queries, centres, rng), kind)
        del M, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="bank rows (1M: 2 GB in LanceDB + 2 GB cache)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows (under a minute)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--centres", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=64, help="queries of each kind")
    parser.add_argument("--query-kinds", nargs="+", choices=sorted(QUERY_KINDS), default=["noise", "text"])
    parser.add_argument("--b1-queries", type=int, default=8, help="queries timed one per call for exact_b1")
    parser.add_argument("-k", "--k", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--nprobes", type=int, nargs="+", default=[50])
    parser.add_argument("--refine", type=int, nargs="+", default=[10])
    parser.add_argument("--partitions", type=int, default=None, help="IVF partitions (default: the library's)")
    parser.add_argument("--sub-vectors", type=int, default=None, help="PQ sub-vectors (default: the library's)")
    parser.add_argument("--chunk", type=int, default=100_000, help="rows per MemoryBank.add commit")
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tmp", default=None, help="folder for the temporary DECAPFLOW_HOME")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.rows = QUICK_ROWS
    run(args)


if __name__ == "__main__":
    main()
