"""The server's side of the compute worker: runs calls on it, notices when it died, replaces it.

A worker that dies (out of memory, a crash in native code) is replaced at once. Requests it was running get a
503 ``worker_restarted`` with a Retry-After (``decapflow caption --server`` retries them once); requests that it
had not begun, and those arriving while the new worker starts, wait for it (bounded) and run there.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from decapflow.serve import worker
from decapflow.serve.errors import ApiError
from decapflow.serve.worker import WorkerSettings

log = logging.getLogger("decapflow.serve")

_BEGUN: dict[str, Any] = {}  # in the worker: server id -> the shared counter of calls begun (see ComputeWorker)


def init_tracked(server_id: str, settings: WorkerSettings, begun: Any) -> None:
    """:func:`init`, plus the shared counter the worker writes each call's number into as it begins it."""
    _BEGUN[server_id] = begun
    worker.init(server_id, settings)


def tracked(server_id: str, seq: int, fn: Any, *args: Any) -> Any:
    """Run ``fn(server_id, *args)``, first recording that call number ``seq`` has begun."""
    _BEGUN[server_id].value = seq
    return fn(server_id, *args)


class _Counter:  # the thread worker's stand-in for a shared integer
    value = 0


#: Seconds between two starts of a worker that keeps dying at start, so a broken set-up does not spin.
RESTART_PAUSE_S = 0.2
#: Retry-After of a call that was in flight in a worker that died (a replacement is already starting).
RETRY_AFTER_RESTART_S = 1
#: Retry-After when no replacement answered within the start timeout.
RETRY_AFTER_UNAVAILABLE_S = 5


def worker_context() -> Any:
    """forkserver where there is one: a worker (a first one, or one replacing a dead one) forks from a process
    that has torch and open_clip imported already (seconds of imports, paid once). LanceDB is imported after the
    fork: its runtime is not fork-safe."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["decapflow.serve.worker", "decapflow.serve.compute", "decapflow.serve.pool",
                                    "open_clip"])
    return context


class ComputeWorker:
    """The server's handle on its compute worker: runs calls on it, notices when it died, replaces it.

    Every call carries a number, and the worker writes that number into memory shared with the server as it
    begins the call (it runs calls one at a time, in the order sent). So when the worker dies, each failed call
    is known to have been *in flight* (begun: it may be what killed the worker, so it is not run again here;
    it fails with 503 ``worker_restarted`` and a Retry-After, and clients retry it once) or *not yet begun*
    (queued behind the fatal call, or sent to a worker that had died between requests): such a call, like any
    call arriving while the replacement starts, waits for it, at most ``start_timeout_s`` (then 503
    ``worker_unavailable`` with a Retry-After), and runs there. A replacement preloads the server's banks.
    """

    def __init__(self, server_id: str, settings: WorkerSettings, mode: str = "process",
                 preload: list[str] | None = None, start_timeout_s: float = 60.0,
                 on_status: Any = None) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"compute must be 'process' or 'thread', not {mode!r}")
        self.server_id, self.settings, self.mode = server_id, settings, mode
        self.preload, self.start_timeout_s = list(preload or []), start_timeout_s
        self.on_status = on_status or (lambda status: None)
        self.restarts = 0  # workers started to replace a dead one
        self._seq = 0
        self._executor, self._begun = self._start()
        self._up: Any = None  # while a replacement starts: an asyncio future done when it answered (or failed to)
        self._tasks: set[Any] = set()
        self._closed = False

    def _start(self) -> tuple[Any, Any]:
        if self.mode == "thread":  # same process: for debugging, and GPU work that frees the GIL
            begun: Any = _Counter()
            return ThreadPoolExecutor(1, "decapflow-compute", initializer=init_tracked,
                                      initargs=(self.server_id, self.settings, begun)), begun
        context = worker_context()
        begun = context.Value("q", 0, lock=False)  # one aligned int64: written by the worker, read here
        return ProcessPoolExecutor(1, mp_context=context, initializer=init_tracked,
                                   initargs=(self.server_id, self.settings, begun)), begun

    async def call(self, fn: Any, *args: Any) -> Any:
        """``fn(server_id, *args)`` on the worker (see the class for what a dead worker means to it)."""
        loop = asyncio.get_running_loop()
        deadline = None  # set when this call first has to wait for a replacement
        for _ in range(100):  # bounded: each round starts a worker or waits on one (RESTART_PAUSE_S at least)
            if self._closed:
                raise ApiError(503, "shutting_down", "the server is stopping", headers={"Retry-After": "1"})
            if self._up is not None:
                deadline = deadline or loop.time() + self.start_timeout_s
                await self._wait_up(deadline)
                continue
            executor, begun = self._executor, self._begun
            self._seq += 1
            seq = self._seq
            try:
                future = executor.submit(tracked, self.server_id, seq, fn, *args)
            except (BrokenExecutor, RuntimeError):  # known dead (or replaced) before this call was sent
                self._replace(executor)
                continue
            try:
                return await asyncio.wrap_future(future)
            except BrokenExecutor as exc:
                in_flight = begun.value >= seq
                self._replace(executor)
                if in_flight:
                    raise ApiError(503, "worker_restarted", "the compute worker stopped while it ran this request "
                                   "and was restarted; retry the request",
                                   headers={"Retry-After": str(RETRY_AFTER_RESTART_S)}) from exc
        raise self._unavailable()

    def _unavailable(self) -> ApiError:
        return ApiError(503, "worker_unavailable", f"the compute worker was restarted and is not answering yet "
                        f"(waited up to {self.start_timeout_s:g} s); retry shortly",
                        headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)})

    async def _wait_up(self, deadline: float) -> None:
        up = self._up
        try:
            await asyncio.wait_for(asyncio.shield(up), max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            raise self._unavailable() from None

    def _replace(self, dead: Any) -> None:
        """Start a new worker in place of ``dead`` (unless another call did already)."""
        if self._executor is not dead or self._closed:
            return
        dead.shutdown(wait=False, cancel_futures=True)
        self.restarts += 1
        log.warning("the compute worker stopped; starting a new one (restart %d)", self.restarts)
        self._executor, self._begun = self._start()
        loop = asyncio.get_running_loop()
        self._up = loop.create_future()
        self._spawn(self._warm(self._executor, self._up))

    async def _warm(self, executor: Any, up: Any) -> None:
        """Wait for a new worker's first answer, then let waiting calls through and preload the banks."""
        answered = False
        try:
            self.on_status(await asyncio.wrap_future(executor.submit(worker.status, self.server_id)))
            answered = True
        except BrokenExecutor:  # it died at start: the next call starts another, after a pause
            await asyncio.sleep(RESTART_PAUSE_S)
        except Exception:  # noqa: BLE001 - the next call will tell
            log.exception("the new compute worker failed its first call")
        finally:
            if self._up is up:
                self._up = None
            up.set_result(None)
        if answered and self.preload and not self._closed:
            self._spawn(self._preload_again())

    async def _preload_again(self) -> None:
        try:
            self.on_status(await self.call(worker.preload, self.preload))
        except Exception as exc:  # noqa: BLE001 - readyz reports the first preload; requests report their own
            log.warning("preloading %s in the new compute worker failed: %s", ", ".join(self.preload), exc)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
