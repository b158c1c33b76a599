"""CPU budgets that add up: how many threads this process computes with, shared fairly with the other decapflow
jobs on the same machine.

Every process that computes (a training, an ingest's embedding, captioning, an evaluation, the server's compute
worker, a Dask worker) holds a :func:`claim` while it works. The thread count it gets is, in order:

1. ``threads`` given by the caller (a command's ``--threads``), else
2. ``$DECAPFLOW_THREADS`` (deployments that run several jobs per machine: Prefect process workers, systemd),
   else ``$OMP_NUM_THREADS`` (what a user who sets it expects), else
3. a fair share of the CPUs this process may use (:func:`usable_cpus`: its affinity and its cgroup's CPU quota,
   not ``os.cpu_count()``), split among the decapflow claims alive on the machine right now: a job alone gets
   them all, two jobs on 2 CPUs get one each. A claim that gave a fixed count (1. or 2.) takes that many off the
   top. Shares are re-read at most every :data:`POLL_S` from the compute loop (:func:`tick`), so a running
   training shrinks within a second when another job starts and grows back when it ends.

Why this and not a fixed setting: on 2 cores, two trainings with 2 busy OpenMP threads each ran at 0.48x the
machine's throughput (threads descheduled in the middle of short parallel regions); with 1 thread each they
reach ~0.97x, but a lone job with 1 thread gives up 40%. ``benchmarks/concurrent_train.py`` measures it.

Claims are small files in one folder per machine (``$DECAPFLOW_CPU_DIR``, else ``/dev/shm/decapflow-cpus``),
each locked with ``flock`` by its owner: a process that dies, however it dies, releases its lock and its claim
stops counting. A *service* claim (the server's compute worker) counts only while it is busy (it answered within
:data:`ACTIVE_S`), so an idle server does not halve a training. The thread count goes to torch (intra-op; the
inter-op pool is set to 1, decapflow runs no inter-op work), to the BLAS libraries numpy loaded (threadpoolctl)
and to Rust tokenisers (``RAYON_NUM_THREADS``, read once when their pool starts).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["ACTIVE_S", "POLL_S", "Share", "acquire", "apply_threads", "blas_threads", "claim", "current",
           "fixed_threads", "release", "tick", "usable_cpus"]

log = logging.getLogger(__name__)

POLL_S = 0.5  #: how often a compute loop re-reads the claims (at most)
ACTIVE_S = 5.0  #: a service claim counts while it worked within this many seconds


# --------------------------------------------------------------------------------------------- budget
def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
                     ) -> float | None:
    """The CPU quota of this process's cgroup and its ancestors, in CPUs (``2.5`` for ``250000 100000``), or
    None when there is none. Reads cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            candidates = [(root / path.lstrip("/"), "cpu.max")]
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            base = root / controllers if (root / controllers).is_dir() else root / "cpu"
            candidates = [(base / path.lstrip("/"), "cpu.cfs_quota_us")]
        else:
            continue
        for folder, name in candidates:
            for parent in [folder, *folder.parents]:
                if not str(parent).startswith(str(root)):
                    break
                limit = _read_quota(parent, name)
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def _read_quota(folder: Path, name: str) -> float | None:
    try:
        if name == "cpu.max":
            quota, period = (folder / name).read_text().split()
        else:
            quota, period = (folder / name).read_text().strip(), (folder / "cpu.cfs_period_us").read_text().strip()
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return int(quota) / int(period)


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity set, capped by its cgroup's CPU quota (rounded down, at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def fixed_threads(threads: int | None = None) -> int | None:
    """The thread count fixed by the caller, ``$DECAPFLOW_THREADS`` or ``$OMP_NUM_THREADS`` (in that order), or
    None for a fair share. Raises ValueError on a count that is not a positive integer."""
    for source, value in (("--threads", threads), ("DECAPFLOW_THREADS", os.environ.get("DECAPFLOW_THREADS")),
                          ("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))):
        if value is None or value == "":
            continue
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"{source} must be a positive number of threads, got {value!r}")
        return count
    return None


# --------------------------------------------------------------------------------------------- claims
def claims_folder() -> Path | None:
    """The machine's claims folder (created world-writable with the sticky bit, like /tmp), or None when it
    cannot be written (then a process counts only itself)."""
    path = Path(os.environ.get("DECAPFLOW_CPU_DIR") or
                (Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())) / "decapflow-cpus")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if path.stat().st_uid == os.getuid():
            path.chmod(0o1777)
        if os.access(path, os.W_OK | os.X_OK):
            return path
    except OSError:
        pass
    log.warning("cannot write CPU claims in %s: this process sizes its threads as if alone", path)
    return None


@dataclass(frozen=True)
class _Other:
    threads: int | None  # fixed count, or None for a fair-share claim
    order: tuple[float, int]  # (start time, pid): who gets a leftover CPU first


def _others(folder: Path, mine: Path | None) -> list[_Other]:
    """The live, active claims in ``folder`` other than ``mine``; files of dead owners are removed."""
    found, now = [], time.time()
    for path in folder.glob("*.json"):
        if path == mine:
            continue
        try:
            with open(path, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:  # its owner holds the lock: alive
                    info = json.loads(f.read() or b"{}")
                    if info.get("service") and now - os.fstat(f.fileno()).st_mtime > ACTIVE_S:
                        continue  # an idle server
                    found.append(_Other(info.get("threads"), (info.get("start", 0.0), info.get("pid", 0))))
                    continue
            path.unlink(missing_ok=True)  # we got the lock: its owner is gone
        except (OSError, ValueError):
            continue  # vanished, half-written or not ours to remove
    return found


class Share:
    """One process's claim on the machine's CPUs. Use :func:`claim` rather than this class directly."""

    def __init__(self, threads: int | None = None, *, service: bool = False, cpus: int | None = None,
                 folder: Path | None = None) -> None:
        self.fixed = fixed_threads(threads)
        self.service = service
        self.cpus = cpus or usable_cpus()
        self.start = time.time()
        self.folder = folder if folder is not None else claims_folder()
        self.path: Path | None = None
        self._file = None
        self._checked = self._touched = 0.0
        self.threads = self.fixed or self.cpus
        if self.folder is not None:
            self.path = self.folder / f"{os.getpid()}-{time.time_ns()}.json"
            self._file = open(self.path, "w")
            fcntl.flock(self._file, fcntl.LOCK_EX)
            self._file.write(json.dumps({"pid": os.getpid(), "threads": self.fixed, "start": self.start,
                                         "service": service}))
            self._file.flush()
        self.tick(force=True)

    def fair_share(self) -> int:
        """This claim's thread count given the other claims alive now (re-read from the folder)."""
        if self.fixed is not None:
            return self.fixed
        others = _others(self.folder, self.path) if self.folder is not None else []
        left = self.cpus - sum(o.threads for o in others if o.threads is not None)
        ahead = sorted([o.order for o in others if o.threads is None] + [(self.start, os.getpid())])
        sharing = len(ahead)
        share, extra = divmod(max(left, 0), sharing)
        return max(1, share + (ahead.index((self.start, os.getpid())) < extra))

    def tick(self, force: bool = False) -> int:
        """Re-read the shares (at most every POLL_S) and apply the count to the calling thread (torch's OpenMP
        count is per thread: call it from the thread that computes) and to BLAS. Returns the thread count."""
        now = time.monotonic()
        if self.service and self._file is not None and now - self._touched >= POLL_S:
            os.utime(self._file.fileno())  # "busy": the other claims count this one for ACTIVE_S
            self._touched = now
        if force or now - self._checked >= POLL_S:
            self._checked = now
            self.threads = self.fair_share()
            apply_threads(self.threads)  # a no-op when nothing changed (two cheap reads)
        return self.threads

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None
            if self.path is not None:
                self.path.unlink(missing_ok=True)


def apply_threads(threads: int) -> None:
    """Set torch's intra-op threads and the BLAS pools numpy loaded to ``threads`` (inter-op to 1, once)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    for lib in _blas_controllers():
        if lib.num_threads != threads:
            lib.set_num_threads(threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    _interop_once()


@lru_cache(maxsize=1)
def _blas_controllers() -> tuple:
    """threadpoolctl's controllers of the BLAS libraries loaded now (numpy's OpenBLAS; MKL under torch)."""
    import numpy  # noqa: F401  (its BLAS must be loaded to be found)
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextmanager
def blas_threads(threads: int | None = None) -> Iterator[None]:
    """Run numpy's BLAS with ``threads`` (default: torch's current intra-op count) inside the block, then restore
    each library's count. Cheap (the libraries are found once), so it can wrap every matrix product."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    saved = [(lib, lib.num_threads) for lib in _blas_controllers() if lib.num_threads != threads]
    for lib, _ in saved:
        lib.set_num_threads(threads)
    try:
        yield
    finally:
        for lib, count in saved:
            lib.set_num_threads(count)


@lru_cache(maxsize=1)
def _interop_once() -> None:
    import torch

    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # inter-op work already ran in this process: its pool is fixed now
        pass


# --------------------------------------------------------------------------------------------- process
_current: Share | None = None
_lock = threading.Lock()


def acquire(threads: int | None = None, *, service: bool = False) -> Share:
    """Hold a share for the rest of the process (or until :func:`release`): what a long-lived worker does.
    Later :func:`claim` blocks reuse it. Returns the held share (the same one when one is held already)."""
    global _current
    with _lock:
        if _current is None:
            _current = Share(threads, service=service)
        return _current


def release() -> None:
    """Give back the share :func:`acquire` took (a no-op when none is held)."""
    global _current
    with _lock:
        share, _current = _current, None
    if share is not None:
        share.close()


@contextmanager
def claim(threads: int | None = None, *, service: bool = False) -> Iterator[Share]:
    """Hold a share of the machine's CPUs for the block (see the module docstring). Nested claims reuse the
    outer one; an inner explicit ``threads`` applies for its block. On exit the calling thread's torch count is
    restored."""
    global _current
    import torch

    before = torch.get_num_threads()
    with _lock:
        outer = _current
        if outer is None:
            _current = Share(threads, service=service)
        share = _current
    saved = share.fixed
    if outer is not None:
        if threads is not None:
            share.fixed = threads
        share.tick(force=threads is not None)
    try:
        yield share
    finally:
        if outer is None:
            release()
            if torch.get_num_threads() != before:
                apply_threads(before)
        elif threads is not None:
            share.fixed = saved
            share.tick(force=True)


def current() -> Share | None:
    """The claim this process holds now, if any."""
    return _current


def tick() -> int | None:
    """Re-apply this process's share from a compute loop (cheap: a clock read between polls); None unclaimed."""
    share = _current
    return share.tick() if share is not None else None


def _forget_in_child() -> None:
    """A forked child must not keep its parent's claim alive nor write to it: it makes its own when it computes."""
    global _current
    if _current is not None and _current._file is not None:
        _current._file.close()  # the parent's descriptor still holds the lock
    _current = None


os.register_at_fork(after_in_child=_forget_in_child)
