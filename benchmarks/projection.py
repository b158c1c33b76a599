"""Benchmark: streaming DeCap projection over a large memory-mapped bank, against baselines in the same run.

What it prints (all measured in this process, on this machine, best of ``--repeats``):

* ``copy``: ``np.copyto`` of the whole bank into a preallocated array (bank bytes / second): the memory
  bandwidth ceiling for anything that reads the bank once.
* ``naive``: the dense torch formula ``softmax(V @ M.T / tau) @ M`` over the whole bank at once (it
  materialises the [B, N] weights and reads the bank twice).
* ``project``: :func:`decapflow.caption.projection.project` (chunked online softmax) and ``nearest``.
* ``torch-chunked`` (``--torch-chunked``): the same streaming algorithm written with torch (MKL), the
  alternative to the library's numpy (OpenBLAS) implementation.

The bank is synthetic but clustered like caption embeddings: ``--centres`` random unit centres, each row a
centre plus Gaussian noise (cosine ~0.8 to its centre), renormalised; it is written to an ``.npy`` in a
temporary folder and memory-mapped read-only, as a real bank's vector cache would be. Queries mimic CLIP
image embeddings: a text-like vector plus strong noise so that the best bank cosine is ~0.3-0.4 (the
modality gap). ``--topk-oracle`` reports how well projection onto the exact k nearest rows (what an ANN
index approximates) matches the exact projection, for k = 16, 64, 256.

    python benchmarks/projection.py --rows 100000            # quick (~1 min)
    python benchmarks/projection.py --rows 1000000 --topk-oracle   # the reported figures (~2 GB of RAM)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from decapflow.caption.projection import nearest, project, project_subset  # noqa: E402


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_clustered_bank(path: Path, rows: int, dim: int, centres: np.ndarray, rng: np.random.Generator) -> None:
    """Write ``rows`` clustered unit vectors to an ``.npy`` file block by block (never all in memory twice)."""
    bank = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    block = 100_000
    for start in range(0, rows, block):
        n = min(block, rows - start)
        which = rng.integers(0, len(centres), n)
        noise = rng.standard_normal((n, dim), dtype=np.float32) * (0.75 / np.sqrt(dim))
        bank[start : start + n] = unit_rows(centres[which] + noise)
    bank.flush()
    del bank


def noise_queries(batch: int, dim: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[batch, D] unit queries: a fresh text-like vector from a random cluster, drowned in isotropic noise (cos
    ~0.3); exact pd's time does not depend on where the queries are, so the stress case serves for timing."""
    which = rng.integers(0, len(centres), batch)
    text = unit_rows(centres[which] + rng.standard_normal((batch, dim), dtype=np.float32) * (0.75 / np.sqrt(dim)))
    noise = rng.standard_normal((batch, dim), dtype=np.float32) / np.sqrt(dim)
    return unit_rows(text + 3.2 * noise).astype(np.float32)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def naive_torch(V: np.ndarray, M: np.ndarray, tau: float) -> torch.Tensor:
    """The dense formula, as a user would first write it."""
    bank = torch.from_numpy(np.asarray(M))  # zero-copy view of the memmap
    weights = torch.softmax(torch.from_numpy(V) @ bank.T / tau, dim=1)  # [B, N]
    out = weights @ bank
    return out / out.norm(dim=1, keepdim=True)


def torch_chunked(V: np.ndarray, M: np.ndarray, tau: float, rows: int = 512) -> torch.Tensor:
    """The same streaming algorithm written with torch (MKL), the alternative the library did not pick."""
    q = torch.from_numpy(V) / tau
    run_max = torch.full((len(V), 1), -torch.inf)
    run_sum = torch.zeros((len(V), 1))
    acc = torch.zeros(V.shape)
    bank = torch.from_numpy(np.asarray(M))
    for start in range(0, len(M), rows):
        chunk = bank[start : start + rows]
        logits = q @ chunk.T
        new_max = torch.maximum(run_max, logits.amax(dim=1, keepdim=True))
        rescale = torch.exp(run_max - new_max)
        weights = logits.sub_(new_max).exp_()
        run_sum.mul_(rescale).add_(weights.sum(dim=1, keepdim=True))
        acc.mul_(rescale).addmm_(weights, chunk)
        run_max = new_max
    return acc / acc.norm(dim=1, keepdim=True)


def report_speed(name: str, seconds: float, bank_bytes: int, batch: int, copy_gbs: float, naive_s: float | None):
    gbs = bank_bytes / seconds / 1e9
    line = f"  {name:<16} B={batch:<3} {seconds * 1e3:9.1f} ms  {seconds / batch * 1e3:8.2f} ms/query  {gbs:6.2f} GB/s"
    line += f"  = {gbs / copy_gbs:5.0%} of copy"
    if naive_s is not None:
        line += f"  {naive_s / seconds:5.2f}x naive"
    print(line)


def speed(args: argparse.Namespace, M: np.ndarray, centres: np.ndarray, rng: np.random.Generator) -> None:
    bank_bytes = M.nbytes
    scratch = np.empty(M.shape, M.dtype)

    def copy() -> None:
        np.copyto(scratch, M)

    copy_s = best_time(copy, args.repeats)
    copy_gbs = bank_bytes / copy_s / 1e9
    print(f"  {'copy':<16}       {copy_s * 1e3:9.1f} ms  {'':>17}  {copy_gbs:6.2f} GB/s  (baseline)")
    for batch in args.batch:
        V = noise_queries(batch, M.shape[1], centres, rng)
        naive_s = best_time(lambda V=V: naive_torch(V, M, args.tau), args.repeats)
        report_speed("naive torch", naive_s, bank_bytes, batch, copy_gbs, None)
        ours = project(V, M, args.tau, chunk_rows=args.chunk_rows)
        error = np.abs(ours.vectors - naive_torch(V, M, args.tau).numpy()).max()
        proj_s = best_time(lambda V=V: project(V, M, args.tau, chunk_rows=args.chunk_rows), args.repeats)
        report_speed("project", proj_s, bank_bytes, batch, copy_gbs, naive_s)
        near_s = best_time(lambda V=V: nearest(V, M, k=1, chunk_rows=args.chunk_rows), args.repeats)
        report_speed("nearest k=1", near_s, bank_bytes, batch, copy_gbs, naive_s)
        if args.torch_chunked:
            torch_s = best_time(lambda V=V: torch_chunked(V, M, args.tau), args.repeats)
            report_speed("torch-chunked", torch_s, bank_bytes, batch, copy_gbs, naive_s)
        print(f"  max |project - naive| = {error:.2e}")


def sweep(args: argparse.Namespace, M: np.ndarray, centres: np.ndarray, rng: np.random.Generator) -> None:
    for batch in args.batch:
        V = noise_queries(batch, M.shape[1], centres, rng)
        for rows in (128, 256, 512, 1024, 2048, 4096, 8192):
            seconds = best_time(lambda V=V, rows=rows: project(V, M, args.tau, chunk_rows=rows), args.repeats)
            print(f"  B={batch:<3} chunk_rows={rows:<5} {seconds / batch * 1e3:8.2f} ms/query "
                  f"{M.nbytes / seconds / 1e9:6.2f} GB/s")


def topk_oracle(args: argparse.Namespace, M: np.ndarray, centres: np.ndarray, rng: np.random.Generator) -> None:
    """cos(projection onto the exact top-k rows, exact projection) and the softmax mass inside the top k."""
    V = noise_queries(args.oracle_queries, M.shape[1], centres, rng)
    ks = (16, 64, 256)
    exact = project(V, M, args.tau, n_support=max(ks))
    ids, sims = nearest(V, M, k=max(ks))
    print(f"  queries={len(V)} best cosine to bank: mean {sims[:, 0].mean():.3f}; "
          f"top-1 weight: mean {exact.support_weights[:, 0].mean():.3f}")
    for k in ks:
        sub = project_subset(V, M, args.tau, neighbor_ids=ids[:, :k])
        cos = (sub.vectors * exact.vectors).sum(axis=1)
        mass = exact.support_weights[:, :k].sum(axis=1)
        print(f"  k={k:<4} cos(topk, exact): mean {cos.mean():.5f} min {cos.min():.5f}   "
              f"softmax mass in top-k: mean {mass.mean():.3f} min {mass.min():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="bank rows (1M = 2 GB float32)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--centres", type=int, default=2000, help="clusters in the synthetic bank")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="queries per call")
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--chunk-rows", type=int, default=None, help="default: the library's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-chunked", action="store_true", help="also time a torch version of the algorithm")
    parser.add_argument("--sweep", action="store_true", help="time project() over chunk sizes")
    parser.add_argument("--topk-oracle", action="store_true", help="how large must k be for topk ≈ exact")
    parser.add_argument("--oracle-queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # we never write
    rng = np.random.default_rng(args.seed)
    centres = unit_rows(rng.standard_normal((args.centres, args.dim), dtype=np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bank.npy"
        start = time.perf_counter()
        write_clustered_bank(path, args.rows, args.dim, centres, rng)
        M = np.load(path, mmap_mode="r")  # read-only memmap, like a real bank's vector cache
        np.asarray(M).sum(dtype=np.float64)  # touch every page once so all runs see a warm page cache
        print(f"bank {args.rows:,} x {args.dim} float32 ({M.nbytes / 1e9:.2f} GB, memmap), "
              f"built in {time.perf_counter() - start:.1f} s; torch threads {torch.get_num_threads()}, "
              f"tau {args.tau}, best of {args.repeats}")
        speed(args, M, centres, rng)
        if args.sweep:
            sweep(args, M, centres, rng)
        if args.topk_oracle:
            topk_oracle(args, M, centres, rng)
        del M


if __name__ == "__main__":
    main()
