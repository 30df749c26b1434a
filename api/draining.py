"""Draining: the app's side of a graceful shutdown (`api/graceful.py` is the server's side).

    drain = Drain()
    app.add_middleware(DrainMiddleware, drain=drain, retry_after_s=5)
    drain.begin()   # on SIGTERM / SIGINT
    drain.expire()  # when the grace is nearly over

After `begin()`, every new request is answered 503 + Retry-After + `Connection: close` (except
`GET /health`: the process is still alive), and the requests already running carry on, their
responses with `Connection: close`. `expire()` answers the requests still running 503 +
Retry-After at once, in place of their results (one whose response had already started is ended
where it stands), and cancels them: a request waiting in a micro-batcher's queue leaves it
(api/batching.py).
"""

from __future__ import annotations

import asyncio
import json

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SHUTTING_DOWN = "the service is shutting down; retry later"


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.running: set[asyncio.Future] = set()  # one per request in progress, set to expire it

    def begin(self) -> None:
        """Refuse new requests from now on. Safe to call from a signal handler."""
        self.draining = True

    def expire(self) -> int:
        """Answer every request still running 503 now (call it on the event loop); returns how
        many there were."""
        expiring = [f for f in self.running if not f.done()]
        for future in expiring:
            future.set_result(None)
        return len(expiring)


class DrainMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        drain: Drain,
        retry_after_s: int,
        open_paths: frozenset[str] = frozenset({"/health"}),
    ):
        self.app = app
        self.drain = drain
        self.retry_after_s = retry_after_s
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope["path"] not in self.open_paths:
            await self._refuse(send)
            return
        started = completed = expired = False

        async def closing_send(message: Message) -> None:
            nonlocal started, completed
            if expired:
                return  # answered 503 already: what the app sends late goes nowhere
            if message["type"] == "http.response.start":
                started = True
                if self.drain.draining:
                    MutableHeaders(scope=message)["Connection"] = "close"
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
            await send(message)

        # The request runs as a task of its own, so that it can be answered when the grace ends
        # without waiting for it: work in a thread (decoding, drawing overlays) can't be
        # cancelled until the thread returns.
        task = asyncio.ensure_future(self.app(scope, receive, closing_send))
        expiry = asyncio.get_running_loop().create_future()
        self.drain.running.add(expiry)
        try:
            await asyncio.wait({task, expiry}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server cancelled this request: pass it on
            task.cancel()
            raise
        finally:
            self.drain.running.discard(expiry)
            expiry.cancel()
        if task.done():
            task.result()  # the app's own exception, if any, for the error middleware
            return
        expired = True
        task.cancel()  # takes effect once its thread, if any, returns
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nothing to report
        if not started:
            await self._refuse(send)
        elif not completed:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": SHUTTING_DOWN}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.retry_after_s).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
