"""Lingering close: an answer sent before the request body was read still reaches the client.

Many HTTP/1.1 clients (Python's urllib, `requests` with a file, plain sockets) write the whole
request body before they read the reply. When the service answers early, a 413 for an upload
over the cap, say, and then closes the connection with the rest of the body unread, the kernel
answers the unread bytes with a TCP reset, and the client sees `ConnectionResetError` or
`BrokenPipeError` in place of the 413. (uvicorn closes at once when the request carried
`Connection: close`, as urllib's do; on a kept-alive connection it keeps reading and discarding
the body, without any bound.)

`LingerMiddleware` does what robust servers do (Apache's and nginx's lingering close): it sends
the early response with `Connection: close`, then reads and discards the rest of the body, at most
`max_bytes` of it and for at most `max_seconds`, and only then completes the response, upon which
the server closes the connection. A client that sends everything first finds the whole answer
waiting; one that keeps sending past the bound is cut off.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("captioner.api")


class LingerMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, max_seconds: float):
        self.app = app
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "0")
        body_done = "transfer-encoding" not in headers and declared in ("", "0")  # no body
        early = False  # the response started before the request body was all read
        unfinished = False  # the early response's last message is held back

        async def tracked_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def lingering_send(message: Message) -> None:
            nonlocal early, unfinished
            if message["type"] == "http.response.start" and not body_done:
                early = True
                MutableHeaders(scope=message)["Connection"] = "close"
            elif (
                early
                and not body_done
                and message["type"] == "http.response.body"
                and not message.get("more_body", False)
            ):
                # The whole answer goes out now; the response is completed (and the connection
                # closed) once the app has returned and the rest of the body has been read.
                unfinished = True
                if not message.get("body"):
                    return
                message = {**message, "more_body": True}
            await send(message)

        await self.app(scope, tracked_receive, lingering_send)
        if unfinished:
            await self._discard_body(receive, scope)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _discard_body(self, receive: Receive, scope: Scope) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_seconds
        discarded = 0
        while discarded <= self.max_bytes:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                break
            if message["type"] != "http.request":
                return  # the client went away
            discarded += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
        logger.info(
            "request body cut off",
            extra={
                "fields": {
                    "path": scope["path"],
                    "discarded_bytes": discarded,
                    "bound": "bytes" if discarded > self.max_bytes else "seconds",
                }
            },
        )
