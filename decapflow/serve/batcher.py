"""Micro-batching: items submitted concurrently under the same key run as one call, off the event loop.

Each key (bank, decoder and options) has a queue and one worker coroutine. The worker takes the first waiting
item, then whatever else is already queued, then waits at most ``max_wait_ms`` for more, up to ``max_batch``
items, and runs ``run(key, items)`` in the executor (one thread: torch work is serial, and the event loop never
waits on it). While a batch runs, new requests queue up and form the next batch, so batches grow with load and a
lone request waits at most ``max_wait_ms``. Workers of keys nobody uses exit after ``idle_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BatchInfo:
    """How an item was served: the size of its batch, seconds queued before it ran, seconds the batch ran."""

    size: int
    queued_s: float
    run_s: float


@dataclass
class _Item:
    value: Any
    future: asyncio.Future
    enqueued: float


class QueueFull(RuntimeError):
    """More items are waiting than the server accepts: try again later."""


class MicroBatcher:
    def __init__(self, run: Callable[[Hashable, list[Any]], Sequence[Any]], executor: Executor, max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 1024, idle_s: float = 60.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.run, self.executor = run, executor
        self.max_batch, self.max_wait, self.max_queue, self.idle_s = max_batch, max_wait_ms / 1000, max_queue, idle_s
        self.on_batch = on_batch
        self._queues: dict[Hashable, asyncio.Queue[_Item]] = {}
        self._workers: dict[Hashable, asyncio.Task] = {}

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting those running)."""
        return sum(q.qsize() for q in self._queues.values())

    async def submit(self, key: Hashable, values: Sequence[Any]) -> list[tuple[Any, BatchInfo]]:
        """Run ``values`` (in batches shared with other callers of the same key); results in order."""
        if self.depth + len(values) > self.max_queue:
            raise QueueFull(f"{self.depth} images are already waiting (limit {self.max_queue}); try again shortly")
        loop = asyncio.get_running_loop()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue()
            self._workers[key] = loop.create_task(self._work(key, queue))
        now = time.perf_counter()
        items = [_Item(v, loop.create_future(), now) for v in values]
        for item in items:  # no await between the lookup and the puts: an idle worker cannot exit in between
            queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in items)))

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        self._workers.clear()
        self._queues.clear()

    async def _gather(self, queue: asyncio.Queue[_Item], first: _Item) -> list[_Item]:
        loop = asyncio.get_running_loop()
        batch, deadline = [first], loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self, key: Hashable, queue: asyncio.Queue[_Item]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), self.idle_s)
            except asyncio.TimeoutError:
                if queue.empty():  # nothing can have been queued since: submit puts without awaiting
                    del self._queues[key], self._workers[key]
                    return
                continue
            batch = [item for item in await self._gather(queue, first) if not item.future.done()]
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run, key, [i.value for i in batch])
            except Exception as exc:  # the whole batch failed (e.g. its bank was deleted): every caller hears why
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            run_s = time.perf_counter() - started
            if self.on_batch:
                self.on_batch(len(batch))
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result((result, BatchInfo(len(batch), started - item.enqueued, run_s)))
