"""Micro-batching: items submitted concurrently under the same key run as one call.

Each key (bank, decoder and options) has a queue and one worker coroutine. The worker takes the first waiting
item, then whatever else is already queued, then waits at most ``max_wait_ms`` for more, up to ``max_batch``
items, and awaits ``run(key, items)`` (which hands the work to the compute worker, so the event loop never runs
torch). While a batch runs, new requests queue up and form the next batch, so batches grow with load and a lone
request waits at most ``max_wait_ms``, and not at all when ``arriving()`` says no other request is being
read. Workers of keys nobody uses exit after ``idle_s``.

``run`` returns one result per item, in order; an item's result may be an exception, which fails that item's
caller alone. An exception raised by ``run`` fails every item of the batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
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
    def __init__(self, run: Callable[[Hashable, list[Any]], Awaitable[Sequence[Any]]], max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 1024, idle_s: float = 60.0,
                 on_batch: Callable[[int], None] | None = None,
                 arriving: Callable[[], int] = lambda: 1) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.run = run
        self.max_batch, self.max_wait, self.max_queue, self.idle_s = max_batch, max_wait_ms / 1000, max_queue, idle_s
        self.on_batch, self.arriving = on_batch, arriving
        self._queues: dict[Hashable, asyncio.Queue[_Item]] = {}
        self._workers: dict[Hashable, asyncio.Task] = {}

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting those running)."""
        return sum(q.qsize() for q in self._queues.values())

    async def submit(self, key: Hashable, values: Sequence[Any]) -> list[tuple[Any, BatchInfo] | Exception]:
        """Run ``values`` (in batches shared with other callers of the same key): per value, in order,
        ``(result, BatchInfo)`` or the exception that failed it."""
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
        return list(await asyncio.gather(*(item.future for item in items), return_exceptions=True))

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
            if remaining <= 0 or not self.arriving():  # nobody else is on the way: do not wait for nothing
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self, key: Hashable, queue: asyncio.Queue[_Item]) -> None:
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
                results = await self.run(key, [i.value for i in batch])
            except Exception as exc:  # the whole batch failed (e.g. its bank was deleted): every caller hears why
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            run_s = time.perf_counter() - started
            if self.on_batch:
                self.on_batch(len(batch))
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, Exception):  # this item alone failed
                    item.future.set_exception(result)
                else:
                    item.future.set_result((result, BatchInfo(len(batch), started - item.enqueued, run_s)))
