"""Streamed captions: words from the micro-batcher's worker thread to the client, as SSE.

    stream = CaptionStream(loop)
    stream.follow(asyncio.ensure_future(service.caption_streamed(pixels, 3, 20, stream)))
    item = await stream.next()  # [CaptionWord, ...] as the search fixes them, then the result

The batch's listeners (`api.caption_work.Listeners`) call `words` in the batcher's worker thread
(with the model in a process of its own, as that process's messages arrive); `words` hands the
words to the event loop with `call_soon_threadsafe`, and the result comes after every word (the
worker's result is delivered by the same queue of callbacks, later). A client that goes away sets
`stopped`: the search drops the image at its next step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from fastapi.sse import format_sse_event

from captioner.results import CaptionResult, CaptionWord

_END = object()


class CaptionStream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.stopped = False  # set on the event loop, read by the worker thread
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._told = 0  # words handed on: a batch retried item by item tells them again
        self._task: asyncio.Future | None = None

    # -- the worker thread's side (the search) ----------------------------------------------------
    def words(self, words: list[CaptionWord]) -> None:
        fresh = [w for w in words if w.index >= self._told]
        if fresh:
            self._told = fresh[-1].index + 1
            self._loop.call_soon_threadsafe(self._queue.put_nowait, fresh)

    # -- the event loop's side (the route) --------------------------------------------------------
    def follow(self, task: asyncio.Future) -> None:
        """`task` gives the final result (or raises); it comes after every word."""
        self._task = task
        task.add_done_callback(lambda _: self._queue.put_nowait(_END))

    async def next(self) -> list[CaptionWord] | tuple[CaptionResult, int]:
        """The next words, in order; after the last, the task's result (or its exception)."""
        assert self._task is not None, "follow() a task first"
        item = await self._queue.get()
        return self._task.result() if item is _END else item

    def stop(self) -> None:
        """The client is gone: stop the search for its image and drop it from the queue."""
        self.stopped = True
        if self._task is not None:
            self._task.cancel()


def sse(event: str, data: dict[str, Any]) -> bytes:
    return format_sse_event(event=event, data_str=json.dumps(data))


def word_events(words: Sequence[CaptionWord], attention: Any, image: Any) -> bytes:
    """`word` events for `words` (PNG overlays are CPU work: call it in a worker thread)."""
    return b"".join(sse("word", w.to_dict(attention, image)) for w in words)
