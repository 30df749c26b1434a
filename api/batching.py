"""Micro-batching: concurrent requests share one model call.

    batcher = MicroBatcher("captioner", run_batch, max_batch_size=16, max_delay_s=0.01, max_queue=64)
    await batcher.start()
    result, batch_size = await batcher.submit(item)

`run_batch(items) -> results` (same length, same order) runs in the batcher's own worker thread, one
batch at a time, so the event loop never blocks on the model. A batch starts once `max_batch_size`
items wait or `max_delay_s` has passed since the oldest arrived, whichever is first; items arriving
while a batch runs form the next one. `max_batch_size=1` turns batching off. The waiting line is
bounded: `submit` raises `QueueFullError` (the API answers 503 + Retry-After) instead of queueing
more than `max_queue` items, and `check_room` raises it before a caller does any work. A caller
that gives up (timeout, disconnect) cancels its future, and items no one waits for any more are
dropped before they reach the model. When a batch raises, its
items are retried one at a time, so one bad item fails only its own request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .prometheus import Metrics

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFullError(Exception):
    """The batcher's queue has no room for the items; retry later."""


class BatcherClosedError(Exception):
    """The batcher is not running (not started yet, or shutting down)."""


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[tuple[Result, int]]
    enqueued_at: float


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    sizes: list[int] = field(default_factory=list)  # the last 1000 batch sizes

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.largest_batch = max(self.largest_batch, size)
        self.sizes = [*self.sizes[-999:], size]


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        metrics: Metrics | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.name = name
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.metrics = metrics
        self.stats = BatcherStats()
        self._queue: deque[_Pending[Item, Result]] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._worker is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-model")
        self._worker = asyncio.create_task(self._run(), name=f"{self.name}-batcher")

    async def close(self) -> None:
        """Stop the worker; requests still waiting fail with `BatcherClosedError`."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(BatcherClosedError(f"{self.name} is shutting down"))
        self._set_depth()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch running now)."""
        return sum(1 for p in self._queue if not p.future.done())

    # -- submitting ------------------------------------------------------------------------------
    def check_room(self, count: int = 1) -> None:
        """Raise `QueueFullError` unless `count` more items fit in the queue now. `submit_many`
        checks again, but a caller can refuse early, before spending work on a request that
        could not be queued (the API checks before decoding the upload)."""
        if len(self._queue) + count > self.max_queue:
            self._drop_abandoned()
            if len(self._queue) + count > self.max_queue:
                raise QueueFullError(
                    f"{self.name} queue is full ({len(self._queue)} of {self.max_queue} waiting)"
                )

    async def submit(self, item: Item) -> tuple[Result, int]:
        """Run `item` in some batch; returns its result and the size of the batch it ran in."""
        [outcome] = await self.submit_many([item])
        return outcome

    async def submit_many(self, items: Sequence[Item]) -> list[tuple[Result, int]]:
        """Queue all `items` at once (all or none), then wait for every result, in order."""
        if self._worker is None:
            raise BatcherClosedError(f"{self.name} is not running")
        self.check_room(len(items))
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for item in items:
            future: asyncio.Future[tuple[Result, int]] = loop.create_future()
            self._queue.append(_Pending(item, future, now))
            futures.append(future)
        self._set_depth()
        self._arrived.set()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for future in futures:  # timeout, disconnect or a failed batch: drop the others too
                future.cancel()
            raise

    # -- the worker ------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._queue[0].enqueued_at + self.max_delay_s
            while len(self._queue) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                if not await self._wait_for_arrival(remaining):
                    break
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                pending = self._queue.popleft()
                if not pending.future.done():  # skip callers that gave up
                    batch.append(pending)
            self._set_depth()
            if batch:
                await self._run_one(loop, batch)

    async def _wait_for_arrival(self, timeout: float) -> bool:
        """True when an item arrives within `timeout` seconds. (Not `asyncio.wait_for`, which
        on Python < 3.12 can swallow a cancellation that races with the event being set.)"""
        waiter = asyncio.ensure_future(self._arrived.wait())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
            return bool(done)
        finally:
            waiter.cancel()

    async def _run_one(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        size = len(batch)
        started = time.perf_counter()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._call, batch)
        except asyncio.CancelledError:  # closing: nobody will see this batch's results
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(
                        BatcherClosedError(f"{self.name} is shutting down")
                    )
            raise
        finally:
            self.stats.record(size)
            if self.metrics is not None:
                self.metrics.batch_size.labels(self.name).observe(size)
                self.metrics.batch_seconds.labels(self.name).observe(time.perf_counter() - started)
        for pending, (ok, value) in zip(batch, outcomes):
            if pending.future.done():
                continue
            if ok:
                pending.future.set_result((value, size))
            else:
                pending.future.set_exception(value)

    def _call(self, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        """Run the batch (in the worker thread); if it fails, run its items one by one, so one
        bad item fails only its own request. Returns (ok, result or exception) per item."""
        try:
            results = self.run_batch([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: run_batch returned {len(results)} results for {len(batch)}"
                )
            return [(True, r) for r in results]
        except Exception as exc:
            if len(batch) == 1:
                return [(False, exc)]
        return [self._call([p])[0] for p in batch]

    def _drop_abandoned(self) -> None:
        self._queue = deque(p for p in self._queue if not p.future.done())
        self._set_depth()

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name).set(self.depth)
