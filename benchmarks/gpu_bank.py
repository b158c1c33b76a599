"""The sizes and timing helpers of ``benchmarks/gpu_check.py``, and its big-bank half: part 3 (exact ``pd`` over a
synthetic bfloat16 bank made on the device, resident and streamed, against copy bandwidths measured in the same run)
and part 4 (IVF-sized spherical k-means on the device against the CPU). See gpu_check.py's docstring."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from decapflow.bank.rows import BF16Rows
from decapflow.caption import device_projection as dp
from decapflow.caption import projection


@dataclass(frozen=True)
class Sizes:
    """What gpu_check runs: the defaults fit < 5 minutes on one H100/H200; ``QUICK`` runs every path on a CPU."""

    rows: int = 6_200_000
    dim: int = 512
    centres: int = 65_536
    reference_rows: int = 1_000_000
    stream_rows: int = 2_000_000
    chunk_sweep: tuple[int, ...] = (16_384, 65_536, 262_144)
    corpus: int | None = None  # world sentences to embed (None: all 24k)
    batch: int = 128
    train: tuple[int, int] = (12_800, 4)  # (rows, epochs) of decap-small on the device
    train_cpu: tuple[int, int] = (800, 2)
    base_config: str = "decap-base"
    base: tuple[int, int] = (12_800, 3)
    base_cpu: tuple[int, int] = (520, 2)
    images: int = 1024
    cpu_images: int = 128
    caption_batch: int = 64
    kmeans_cpu_rows: int = 1_000_000
    repeats: int = 5


QUICK = Sizes(rows=20_000, dim=64, centres=256, reference_rows=5_000, stream_rows=8_000, chunk_sweep=(1024, 4096),
              corpus=400, batch=16, train=(96, 2), train_cpu=(64, 2), base_config="tiny", base=(64, 2),
              base_cpu=(64, 2), images=32, cpu_images=16, caption_batch=16, kmeans_cpu_rows=8_000, repeats=2)


def log(message: str) -> None:
    print(message, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Median wall seconds of ``fn()`` (synchronised before and after) after ``warmup`` calls, and its last result."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def median_s(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    return timed(fn, device, repeats, warmup)[0]


def copy_s(dst: torch.Tensor, src: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``dst.copy_(src)``: CUDA events on a GPU, wall time on CPU."""
    device = dst.device if dst.is_cuda else src.device
    if device.type != "cuda":
        return median_s(lambda: dst.copy_(src), device, repeats)
    dst.copy_(src, non_blocking=True)
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------- 3. exact pd
def clustered_bank(s: Sizes, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bfloat16 [rows, dim] unit rows made on the device, and their float32 centres."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = F.normalize(torch.randn(s.centres, s.dim, generator=g, device=device), dim=1)
    out = torch.empty((s.rows, s.dim), dtype=torch.bfloat16, device=device)
    for start in range(0, s.rows, 262_144):
        n = min(262_144, s.rows - start)
        pick = torch.randint(0, s.centres, (n,), generator=g, device=device)
        noise = torch.randn(n, s.dim, generator=g, device=device) * (0.75 / s.dim**0.5)
        out[start : start + n] = F.normalize(centres[pick] + noise, dim=1)
    return out, centres


def image_queries(centres: torch.Tensor, batch: int, seed: int) -> np.ndarray:
    g = torch.Generator(device=centres.device).manual_seed(seed)
    dim = centres.shape[1]
    pick = torch.randint(0, len(centres), (batch,), generator=g, device=centres.device)
    text = F.normalize(centres[pick] + torch.randn(batch, dim, generator=g, device=centres.device)
                       * (0.75 / dim**0.5), dim=1)
    noisy = text + torch.randn(batch, dim, generator=g, device=centres.device) * (3.0 / dim**0.5)
    return F.normalize(noisy, dim=1).cpu().numpy()


def compare(a: projection.Projection, b: projection.Projection) -> tuple[float, bool]:
    cos = float(np.min(np.sum(a.vectors * b.vectors, axis=1)))
    return cos, bool((a.support_ids == b.support_ids).all())


def host_bits(rows: torch.Tensor) -> BF16Rows:
    return BF16Rows(rows.view(torch.int16).cpu().numpy().view(np.uint16))


def part_pd(r: dict[str, Any], s: Sizes, device: torch.device) -> torch.Tensor:
    start = time.perf_counter()
    rows, centres = clustered_bank(s, device)
    sync(device)
    bank = dp.DeviceBank.from_tensor(rows)
    gb = bank.nbytes / 1e9
    log(f"   bank {s.rows:,} x {s.dim} bfloat16 ({gb:.2f} GB) made on {device} in {time.perf_counter() - start:.1f} s")
    dst = torch.empty_like(rows)
    copy = copy_s(dst, rows, s.repeats)
    del dst
    r["bank_GB"] = gb
    r["copy_GBps_read_write"] = 2 * bank.nbytes / copy / 1e9
    log(f"   device copy_ of the same size: {r['copy_GBps_read_write']:,.0f} GB/s counting bytes read + written "
        f"({2 * gb:.2f} GB in {copy * 1e3:.2f} ms)")
    queries = {b: image_queries(centres, b, seed=b) for b in (1, 8, 64)}
    for b in (1, 64):
        t = median_s(lambda b=b: dp.project(queries[b], bank, n_support=5), device, s.repeats)
        r[f"b{b}"] = {"ms_per_call": t * 1e3, "ms_per_image": t * 1e3 / b, "effective_GBps": bank.nbytes / t / 1e9,
                      "of_copy": bank.nbytes / t / 1e9 / r["copy_GBps_read_write"], "chunk_rows": bank.chunk_rows}
        log(f"   pd batch {b:2d}: {t * 1e3:8.2f} ms/call, {t * 1e3 / b:7.3f} ms/image, {r[f'b{b}']['effective_GBps']:,.0f} "
            f"GB/s of bank read ({r[f'b{b}']['of_copy']:.2f}x the copy's read+write GB/s), chunks of {bank.chunk_rows:,}")
    r["sweep"] = {}
    for rows_per_chunk in s.chunk_sweep:
        r["sweep"][rows_per_chunk] = {
            f"b{b}_ms": 1e3 * median_s(lambda b=b, c=rows_per_chunk: dp.project(queries[b], bank, chunk_rows=c),
                                       device, max(2, s.repeats // 2)) for b in (1, 64)}
        log(f"   chunk {rows_per_chunk:>8,} rows: batch 1 {r['sweep'][rows_per_chunk]['b1_ms']:.2f} ms, "
            f"batch 64 {r['sweep'][rows_per_chunk]['b64_ms']:.2f} ms")
    exact = dp.project(queries[64], bank, n_support=5)
    tf32_s = median_s(lambda: dp.project(queries[64], bank, n_support=5, matmul_precision="high"), device, s.repeats)
    cos, same = compare(dp.project(queries[64], bank, n_support=5, matmul_precision="high"), exact)
    r["tf32"] = {"min_cos": cos, "same_ids": same, "b64_ms": tf32_s * 1e3}
    log(f"   TF32 allowed: cosine to float32 {cos:.7f}, same support ids {same}, batch 64 {tf32_s * 1e3:.2f} ms")
    ref_rows = min(s.reference_rows, s.rows)
    host, head = host_bits(rows[:ref_rows]), dp.DeviceBank.from_tensor(rows[:ref_rows])
    r["reference"] = {"rows": ref_rows, "min_cos": 1.0, "same_ids": True}
    for tau in (0.01, 0.001):
        start = time.perf_counter()
        cpu = projection.project(queries[8], host, tau=tau, n_support=5)
        cpu_s = time.perf_counter() - start
        cos, same = compare(dp.project(queries[8], head, tau=tau, n_support=5), cpu)
        ref = r["reference"]
        ref.update(min_cos=min(ref["min_cos"], cos), same_ids=ref["same_ids"] and same, cpu_b8_s=cpu_s)
        log(f"   against numpy on CPU over the first {ref_rows:,} rows (8 queries, tau {tau}, {cpu_s:.2f} s there): "
            f"cosine {cos:.7f}, same support ids {same}")
    part_streamed(r.setdefault("streamed", {}), s, device, rows, queries)
    return rows


def part_streamed(r: dict[str, Any], s: Sizes, device: torch.device, rows: torch.Tensor,
                  queries: dict[int, np.ndarray]) -> None:
    n = min(s.stream_rows, s.rows)
    bits = host_bits(rows[:n])
    pinned = torch.empty((n, s.dim), dtype=torch.int16, pin_memory=device.type == "cuda")
    pinned.copy_(rows[:n].view(torch.int16))
    h2d = copy_s(torch.empty_like(rows[:n].view(torch.int16)), pinned, s.repeats)
    del pinned
    nbytes = n * s.dim * 2
    r["rows"], r["h2d_GBps"] = n, nbytes / h2d / 1e9
    log(f"   streamed: {n:,} rows ({nbytes / 1e9:.2f} GB) in host memory; pinned host-to-device copy "
        f"{r['h2d_GBps']:.1f} GB/s")
    resident = dp.project(queries[64], dp.DeviceBank.from_tensor(rows[:n]), n_support=5)
    sync(device)
    start = time.perf_counter()
    uploaded = dp.DeviceBank(bits, device)  # what a captioner does with its BF16Rows copy: chunk by chunk
    upload_s = time.perf_counter() - start
    cos, same = compare(dp.project(queries[64], uploaded, n_support=5), resident)
    r["upload"] = {"mode": uploaded.mode, "GBps": nbytes / upload_s / 1e9, "min_cos": cos, "same_ids": same}
    log(f"   uploading it from host memory: {uploaded.placement.describe()}, {r['upload']['GBps']:.1f} GB/s; "
        f"against the bank made there: cosine {cos:.7f}, same support ids {same}")
    del uploaded
    worst = 1.0
    for name, pin_whole in (("staged", False), ("pinned_whole", True)):
        bank = dp.DeviceBank(bits, device, force_stream=True, pin_whole=pin_whole)
        r[name] = {}
        for b in (1, 64):
            t = median_s(lambda b=b, bank=bank: dp.project(queries[b], bank, n_support=5), device,
                         max(2, s.repeats // 2))
            r[name][f"b{b}"] = {"ms_per_call": t * 1e3, "GBps": nbytes / t / 1e9,
                                "of_h2d": nbytes / t / 1e9 / r["h2d_GBps"]}
            log(f"   {name:12s} batch {b:2d}: {t * 1e3:8.1f} ms/call, {nbytes / t / 1e9:6.1f} GB/s "
                f"({r[name][f'b{b}']['of_h2d']:.2f}x the pinned copy)")
        cos, same = compare(dp.project(queries[64], bank, n_support=5), resident)
        worst = min(worst, cos)
        r[name]["same_ids_as_resident"] = same
    r["min_cos"] = worst
    log(f"   streamed against resident: cosine >= {worst:.7f}")


# ------------------------------------------------------------------------------------------- 4. k-means
def lance_sizing(rows: int, sample_rate: int = 64) -> tuple[int, int]:
    """(partitions, sample rows) as MemoryBank.build_index asks LanceDB for them."""
    partitions = max(1, min(4096, int(rows**0.5), rows // sample_rate))
    return partitions, min(rows, partitions * sample_rate)


def spherical_kmeans(x: torch.Tensor, k: int, iterations: int = 10, seed: int = 0) -> float:
    """Dot-product k-means of unit rows ``x`` [S, D] float32 (an empty cluster keeps its centroid); returns the mean
    cosine of the rows to their centroid after the last iteration."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=g, device=x.device)[:k]].clone()  # [k, D]
    best = torch.empty(len(x), device=x.device)  # [S] cosine to the nearest centroid
    assign = torch.empty(len(x), dtype=torch.int64, device=x.device)  # [S] its index
    for iteration in range(iterations + 1):  # the extra pass only scores the final centroids
        for start in range(0, len(x), 32_768):
            scores = x[start : start + 32_768] @ centroids.T  # [c, k]
            best[start : start + 32_768], assign[start : start + 32_768] = scores.max(dim=1)
        if iteration == iterations:
            break
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # [k, D]
        counts = torch.bincount(assign, minlength=k)
        centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=1), centroids)
    return float(best.mean())


def part_kmeans(r: dict[str, Any], s: Sizes, device: torch.device, rows: torch.Tensor) -> None:
    g = torch.Generator(device=device).manual_seed(1)
    order = torch.randperm(len(rows), generator=g, device=device)
    cpu = torch.device("cpu")
    for name, bank_rows, where in (("device_full", len(rows), device), ("device_small", s.kmeans_cpu_rows, device),
                                   ("cpu_small", s.kmeans_cpu_rows, cpu)):
        bank_rows = min(bank_rows, len(rows))
        partitions, sample = lance_sizing(bank_rows)
        x = rows[order[:sample]].float().to(where)  # LanceDB samples sample_rate rows per partition
        warm = 1 if where.type == "cuda" else 0
        seconds, mean_cos = timed(lambda x=x, k=partitions: spherical_kmeans(x, k), where, 1 + 2 * warm, warm)
        r[name] = {"bank_rows": bank_rows, "partitions": partitions, "sample_rows": sample, "seconds": seconds,
                   "mean_cos": mean_cos}
        log(f"   {name:12s} on {where}: {partitions:,} partitions from {sample:,} sample rows (bank of "
            f"{bank_rows:,}), 10 iterations: {seconds:.3f} s (rows at cosine {mean_cos:.3f} to their centroid)")
    r["speedup_same_size"] = r["cpu_small"]["seconds"] / r["device_small"]["seconds"]
    log(f"   same size on {device}: {r['speedup_same_size']:.1f}x the CPU's speed")
