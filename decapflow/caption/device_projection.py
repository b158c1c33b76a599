"""DeCap's exact projection (``pd``) on a torch device: the bank held on a GPU in bfloat16, or streamed to it.

    bank = DeviceBank(vectors, "cuda")            # float32/float16 array or memmap, or a BF16Rows copy
    p = project(image_vectors, bank, tau=0.01)    # a projection.Projection (numpy arrays), the same contract

It is :func:`decapflow.caption.projection.project` (same online softmax over chunks of rows: running max ``m``,
sum ``l``, weighted sum ``acc``) with one matrix product for the scores and one for the weighted sum per chunk.

**Where the bank lives** (``bank.mode``, decided once by :func:`resident_fits`):

- ``resident``: one bfloat16 [N, D] tensor on the device (2 bytes a value: 6.35 GB for 6.2M x 512), uploaded chunk
  by chunk through two reused host slots (no float32 copy of the bank is ever made in host RAM; a BF16Rows copy's
  uint16 bits are viewed as int16 and then as bfloat16 on the device, no conversion). Chosen when the bank plus a
  call's workspace leave ``max(MIN_FREE_BYTES, FREE_FRACTION * total)`` of the device's memory free.
- ``streamed``: the bank stays in host memory and every call copies it over in chunks: a chunk's bits are copied
  into one of two pinned slots, sent with ``non_blocking=True`` on a side stream into one of two device buffers,
  and the copy of chunk i+1 is queued before chunk i is computed (CUDA events order the reuse of both buffers).
  ``pin_whole=True`` instead pins one host copy of the whole bank once, so a call is bound by the host-to-device
  link rather than by the host memcpy into the slots. ``force_stream=True`` picks this mode on any bank (tests).

On the ``cpu`` device the same code runs without streams or pinning (resident: a zero-copy view of a BF16Rows
memmap), which is how the tests check it equals the numpy path everywhere; decapflow still projects with numpy on
CPU (``BankProjector``), which is faster there (see projection.py).

**Precision.** Bank rows are bfloat16, like the CPU path's BF16Rows copy. The query is never rounded to bfloat16:
on random 512-d rows that moves the logits by up to ~0.035 at tau = 0.01 (~0.35 at 0.001) and the support weights
by ~1e-3 (``test_the_query_is_not_rounded_to_bfloat16``). Each chunk is widened to float32 on the device (exact)
and both products run in float32 with TF32 off (``matmul_precision="highest"`` for the call, restored after), so
this is the CPU path's arithmetic over the same rows up to float32 summation order: cosine to
``projection.project`` over the same bfloat16 rows 1 - 2.4e-7 at worst, the same top support ids, weights within
6e-7 (CPU; random and clustered banks, tau 0.01 and 0.001, every placement). The alternative, a bfloat16 hi + lo
split of the query so the products read the chunk once on tensor cores, needs float32 outputs from bfloat16
products (``torch.mm(..., out_dtype=torch.float32)`` is CUDA only; a bfloat16 output rounds each score by ~2^-9
relative, ~0.05 of a logit) and could not be tested here; ``benchmarks/gpu_check.py`` measures what the widening
costs (effective GB/s against a device-to-device copy) and whether TF32 would change the result.

Top support rows: ``torch.topk`` on each chunk's logits, kept in a [B, chunks * s] candidate buffer, merged by one
``topk`` at the end (fewer kernel launches than a merge per chunk).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from decapflow.bank.rows import BF16Rows
from decapflow.caption import projection
from decapflow.caption.projection import Projection

__all__ = ["BACKENDS", "BankProjector", "DeviceBank", "Placement", "project", "resident_fits"]

#: Device memory a resident bank must leave free: at least this many bytes ...
MIN_FREE_BYTES = 2 << 30
#: ... and at least this share of the device's total memory (the decoder, the encoder, other processes).
FREE_FRACTION = 0.10
#: float32 bytes of one widened chunk: 128 MiB (65,536 rows at 512-d) on CUDA, where each chunk costs ~17 kernel
#: launches (fewer, larger chunks keep the GPU busy); 8 MiB on CPU. ``benchmarks/gpu_check.py`` sweeps it.
CUDA_CHUNK_BYTES = 128 << 20
CPU_CHUNK_BYTES = 8 << 20
#: A call's logits [B, c] are kept under this many bytes by shrinking the chunk for big batches.
MAX_LOGIT_BYTES = 1 << 30
#: Batch size the resident workspace estimate allows for.
WORKSPACE_BATCH = 256


def resident_fits(bank_bytes: int, free_bytes: int, total_bytes: int, workspace_bytes: int = 0, *,
                  min_free_bytes: int = MIN_FREE_BYTES, free_fraction: float = FREE_FRACTION) -> bool:
    """Whether a bank of ``bank_bytes`` plus a call's ``workspace_bytes`` fits in ``free_bytes`` of device memory
    while leaving ``max(min_free_bytes, free_fraction * total_bytes)`` free."""
    keep = max(int(min_free_bytes), int(free_fraction * total_bytes))
    return bank_bytes + workspace_bytes + keep <= free_bytes


@dataclass(frozen=True)
class Placement:
    """Where a DeviceBank put its rows and why. ``free_bytes``/``total_bytes``: the device's memory when it was
    decided (None on CPU)."""

    mode: str  # "resident" | "streamed"
    device: str
    bank_bytes: int
    free_bytes: int | None
    total_bytes: int | None
    reason: str

    def describe(self) -> str:
        memory = "" if self.free_bytes is None else f"; {self.free_bytes / 1e9:.2f} GB free of {self.total_bytes / 1e9:.2f} GB"
        return f"{self.mode} on {self.device}: {self.bank_bytes / 1e9:.3f} GB of bfloat16 rows ({self.reason}{memory})"


def _host_source(bank) -> np.ndarray:
    """The bank as a 2-d numpy array: int16 bfloat16 bits (BF16Rows) or float rows (converted chunk by chunk)."""
    if isinstance(bank, BF16Rows):
        source = bank.bits.view(np.int16)
    elif isinstance(bank, torch.Tensor):
        source = bank.detach().cpu().numpy()
    else:
        source = bank if isinstance(bank, np.ndarray) else np.asarray(bank)
        if source.dtype.kind != "f":
            raise ValueError(f"bank rows must be floats or a BF16Rows copy, got dtype {source.dtype}")
    if source.ndim != 2 or source.shape[0] == 0 or source.shape[1] == 0:
        raise ValueError(f"bank must be a non-empty [N, D] array, got shape {source.shape}")
    return source


def _fill_bits(source: np.ndarray, start: int, out: np.ndarray) -> None:
    """Write the bfloat16 bits of rows ``start : start + len(out)`` of ``source`` into ``out`` (int16 [c, D])."""
    rows = source[start : start + len(out)]
    if source.dtype == np.int16:
        np.copyto(out, rows)
    else:  # round to nearest even, exactly as BF16Rows.encode (and torch's float32 -> bfloat16)
        np.copyto(out, BF16Rows.encode(np.asarray(rows, dtype=np.float32)).view(np.int16))


class DeviceBank:
    """A bank's rows in bfloat16 for :func:`project` on ``device``: resident there, or streamed from host memory.

    ``bank``: a float32/float16 array or memmap [N, D], a :class:`BF16Rows` copy, or a CPU tensor.
    ``chunk_rows``: rows per step (default: ``CUDA_CHUNK_BYTES``/``CPU_CHUNK_BYTES`` of float32).
    ``force_stream``: stream even when the bank would fit. ``pin_whole``: when streaming, pin one host copy of the
    whole bank (fast calls, N x D x 2 bytes of locked host memory) instead of two pinned chunk slots."""

    def __init__(self, bank, device: str | torch.device = "cpu", *, chunk_rows: int | None = None,
                 force_stream: bool = False, pin_whole: bool = False, min_free_bytes: int = MIN_FREE_BYTES,
                 free_fraction: float = FREE_FRACTION) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._source = _host_source(bank)
        self.rows, self.dim = (int(s) for s in self._source.shape)
        self.nbytes = self.rows * self.dim * 2
        self.chunk_rows = int(chunk_rows) if chunk_rows else self.default_chunk_rows(self.device, self.dim)
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self._cuda = self.device.type == "cuda"
        self.placement = self._place(force_stream, min_free_bytes, free_fraction)
        self._resident: torch.Tensor | None = None  # int16 [N, D] on the device (resident mode)
        self._pinned: torch.Tensor | None = None  # int16 [N, D] host copy (streamed, pin_whole)
        if self.mode == "resident":
            self._resident = self._upload()
        elif pin_whole:
            self._pinned = self._host_copy()

    @classmethod
    def from_tensor(cls, rows: torch.Tensor) -> DeviceBank:
        """A resident bank over a bfloat16 [N, D] tensor that is already on its device (no copy)."""
        if rows.dtype != torch.bfloat16 or rows.ndim != 2 or rows.shape[0] == 0:
            raise ValueError(f"need a non-empty bfloat16 [N, D] tensor, got {rows.dtype} {tuple(rows.shape)}")
        self = cls.__new__(cls)
        self.device, self._cuda = rows.device, rows.device.type == "cuda"
        self.rows, self.dim = (int(s) for s in rows.shape)
        self.nbytes = self.rows * self.dim * 2
        self.chunk_rows = self.default_chunk_rows(self.device, self.dim)
        self._source, self._pinned = np.empty((0, self.dim), np.int16), None
        self._resident = rows.contiguous().view(torch.int16)
        self.placement = Placement("resident", str(self.device), self.nbytes, None, None, "given on the device")
        return self

    @staticmethod
    def default_chunk_rows(device: torch.device, dim: int) -> int:
        budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
        return max(256, budget // (4 * dim))

    @property
    def mode(self) -> str:
        return self.placement.mode

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"DeviceBank({self.rows} x {self.dim}, {self.placement.describe()})"

    # -- placement and upload ----------------------------------------------------------------------------
    def _place(self, force_stream: bool, min_free_bytes: int, free_fraction: float) -> Placement:
        where = str(self.device)
        if force_stream:
            return Placement("streamed", where, self.nbytes, None, None, "streaming forced")
        if not self._cuda:
            return Placement("resident", where, self.nbytes, None, None, "host memory")
        free, total = torch.cuda.mem_get_info(self.device)
        rows = self.chunk_rows
        workspace = rows * self.dim * 4 + WORKSPACE_BATCH * rows * 4 * 2  # widened chunk, logits and their exp
        if resident_fits(self.nbytes, free, total, workspace, min_free_bytes=min_free_bytes,
                         free_fraction=free_fraction):
            return Placement("resident", where, self.nbytes, free, total, "fits with room to spare")
        return Placement("streamed", where, self.nbytes, free, total, "too big to keep on the device")

    def _host_chunks(self, rows: int, stream: torch.cuda.Stream | None = None
                     ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, bits)``: int16 [c, D] host chunks of the bank. From the pinned whole copy when there is one,
        else in two reused (pinned, on CUDA) slots; a slot is refilled only once the copies the consumer queued
        from it on ``stream`` (before asking for the next chunk) are done."""
        if self._pinned is not None:
            for start in range(0, self.rows, rows):
                yield start, self._pinned[start : start + rows]
            return
        slots = [torch.empty((min(rows, self.rows), self.dim), dtype=torch.int16, pin_memory=self._cuda)
                 for _ in range(2)]
        done: list[torch.cuda.Event | None] = [None, None]
        for i, start in enumerate(range(0, self.rows, rows)):
            s = i % 2
            if done[s] is not None:
                done[s].synchronize()
            chunk = slots[s][: min(rows, self.rows - start)]
            _fill_bits(self._source, start, chunk.numpy())
            yield start, chunk
            if self._cuda:
                done[s] = (stream or torch.cuda.current_stream(self.device)).record_event()

    def _upload(self) -> torch.Tensor:
        if not self._cuda and self._source.dtype == np.int16 and self._source.flags.c_contiguous:
            with warnings.catch_warnings():  # a read-only memmap: never written through this view
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(self._source)
        out = torch.empty((self.rows, self.dim), dtype=torch.int16, device=self.device)
        for start, bits in self._host_chunks(self.chunk_rows):
            out[start : start + len(bits)].copy_(bits, non_blocking=self._cuda)
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def _host_copy(self) -> torch.Tensor:
        out = torch.empty((self.rows, self.dim), dtype=torch.int16, pin_memory=self._cuda)
        view = out.numpy()
        for start in range(0, self.rows, self.chunk_rows):
            _fill_bits(self._source, start, view[start : start + self.chunk_rows])
        return out

    # -- chunks on the device ----------------------------------------------------------------------------
    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, chunk)``: bfloat16 [c, D] blocks of rows on the device, in order. A streamed chunk lives in a
        reused buffer: it is valid until the next one is asked for (work queued on it before then is fine)."""
        rows = int(rows or self.chunk_rows)
        if self._resident is not None:
            for start in range(0, self.rows, rows):
                yield start, self._resident[start : start + rows].view(torch.bfloat16)
        elif not self._cuda:
            for start, bits in self._host_chunks(rows):
                yield start, bits.view(torch.bfloat16)
        else:
            yield from self._streamed(rows)

    def _streamed(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Double-buffered host-to-device copies on a side stream; chunk i+1's copy is queued before chunk i is
        handed out for compute, and a device buffer is overwritten only after the compute queued on it ended."""
        compute = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        buffers = [torch.empty((min(rows, self.rows), self.dim), dtype=torch.int16, device=self.device)
                   for _ in range(2)]
        copied = [torch.cuda.Event(), torch.cuda.Event()]
        consumed: list[torch.cuda.Event | None] = [None, None]
        host = self._host_chunks(rows, stream=side)

        def enqueue(i: int) -> tuple[int, int] | None:
            item = next(host, None)
            if item is None:
                return None
            start, bits = item
            s = i % 2
            with torch.cuda.stream(side):
                if consumed[s] is not None:
                    side.wait_event(consumed[s])
                buffers[s][: len(bits)].copy_(bits, non_blocking=True)
                copied[s].record(side)
            return start, len(bits)

        try:
            i, pending = 0, enqueue(0)
            while pending is not None:
                start, n = pending
                pending = enqueue(i + 1)
                compute.wait_event(copied[i % 2])
                yield start, buffers[i % 2][:n].view(torch.bfloat16)
                consumed[i % 2] = compute.record_event()
                i += 1
        finally:
            compute.wait_stream(side)  # nothing still writes into the buffers when they are freed


@contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    """float32 products at ``precision`` inside the block ("highest": no TF32), then the caller's setting."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _queries(V, dim: int) -> np.ndarray:
    q = projection._queries(V)  # [B, D] float32, finite
    if q.shape[1] != dim:
        raise ValueError(f"bank vectors have {dim} dims but queries have {q.shape[1]}: different encoders?")
    return q


@torch.no_grad()
def project(V, bank: DeviceBank, tau: float = 0.01, n_support: int = 5, chunk_rows: int | None = None,
            matmul_precision: str = "highest") -> Projection:
    """DeCap projection of B queries onto the whole ``bank``, exact, on the bank's device (see the module doc).

    ``V``: [B, D] (or [D]) unit queries (numpy or a tensor). ``chunk_rows``: rows per step (default the bank's,
    shrunk so the [B, c] logits stay under ``MAX_LOGIT_BYTES``). ``n_support``: heaviest rows to report.
    ``matmul_precision``: torch's float32 product precision for the call ("high" allows TF32; for measuring).
    Returns numpy arrays; equal to ``projection.project`` over the same bfloat16 rows."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if n_support < 0:
        raise ValueError(f"n_support must be >= 0, got {n_support}")
    q_host = _queries(V, bank.dim) / np.float32(tau)  # [B, D], scaled on the host exactly as the numpy path does
    batch, dim = q_host.shape
    rows = int(chunk_rows or bank.chunk_rows)
    rows = max(1, min(rows, bank.rows, max(256, MAX_LOGIT_BYTES // (4 * batch))))
    dev = bank.device
    q = torch.from_numpy(q_host).to(dev)  # [B, D] float32
    run_max = torch.full((batch, 1), -math.inf, device=dev)  # [B, 1] m: running max of the logits
    run_sum = torch.zeros((batch, 1), device=dev)  # [B, 1] l: running sum of exp(s - m)
    acc = torch.zeros((batch, dim), device=dev)  # running sum of exp(s - m) * row
    k = min(n_support, bank.rows)
    n_chunks = math.ceil(bank.rows / rows)
    cand_values = torch.full((batch, n_chunks * k), -math.inf, device=dev)  # [B, chunks * k]
    cand_ids = torch.full((batch, n_chunks * k), -1, dtype=torch.int64, device=dev)
    with _matmul_precision(matmul_precision):
        for i, (start, chunk) in enumerate(bank.chunks(rows)):
            x = chunk.float()  # [c, D] exact widening
            logits = torch.mm(q, x.T)  # [B, c], already divided by tau
            if k:
                kc = min(k, len(x))
                values, ids = logits.topk(kc, dim=1)  # [B, kc], sorted: column 0 is the chunk max
                cand_values[:, i * k : i * k + kc] = values
                cand_ids[:, i * k : i * k + kc] = ids + start
                chunk_max = values[:, :1]
            else:
                chunk_max = logits.amax(dim=1, keepdim=True)
            new_max = torch.maximum(run_max, chunk_max)
            rescale = torch.exp(run_max - new_max)  # [B, 1]; exp(-inf) = 0 on the first chunk
            weights = logits.sub_(new_max).exp_()  # [B, c] in place; <= 1, never overflows
            run_sum.mul_(rescale).add_(weights.sum(dim=1, keepdim=True))
            acc.mul_(rescale).addmm_(weights, x)  # [B, D]
            run_max = new_max
    vectors = torch.nn.functional.normalize(acc, dim=-1, eps=1e-12)
    support_ids = np.full((batch, n_support), -1, dtype=np.int64)
    support_weights = np.zeros((batch, n_support), dtype=np.float32)
    if k:
        top, where = cand_values.topk(k, dim=1)  # [B, k]
        support_ids[:, :k] = cand_ids.gather(1, where).cpu().numpy()
        support_weights[:, :k] = (torch.exp(top - run_max) / run_sum).cpu().numpy()
    return Projection(vectors.cpu().numpy(), support_ids, support_weights)


# ------------------------------------------------------------------------------------------ for a captioner
#: How a captioner projects (``pd`` and the ``pd``/``pd@TAU`` rerank candidates): "auto" (through a DeviceBank on
#: CUDA, numpy on CPU), "numpy" (projection.project) or "torch" (a DeviceBank on the captioner's device, CPU too).
BACKENDS = ("auto", "numpy", "torch")


class BankProjector:
    """Projects queries onto one bank copy with the backend chosen for a device; the DeviceBank is built on first
    use, once (thread-safe), and shared by every holder of this object (a captioner's ``with_options`` copies)."""

    def __init__(self, vectors: np.ndarray | BF16Rows, device: str | torch.device = "cpu",
                 backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown projector backend {backend!r}; choose from {BACKENDS}")
        self.vectors = vectors
        self.device = torch.device(device)
        self.backend = backend if backend != "auto" else ("torch" if self.device.type == "cuda" else "numpy")
        self._bank: DeviceBank | None = None
        self._lock = threading.Lock()

    @property
    def device_bank(self) -> DeviceBank:
        with self._lock:
            if self._bank is None:
                self._bank = DeviceBank(self.vectors, self.device)
            return self._bank

    @property
    def loaded(self) -> bool:
        return self._bank is not None

    def project(self, V, tau: float = 0.01, n_support: int = 5) -> Projection:
        if self.backend == "numpy":
            return projection.project(V, self.vectors, tau=tau, n_support=n_support)
        return project(V, self.device_bank, tau=tau, n_support=n_support)

    def subset(self, vectors: np.ndarray | BF16Rows) -> BankProjector:
        """The same device and backend over other rows (a restricted captioner's); its DeviceBank is its own."""
        return BankProjector(vectors, self.device, self.backend)
