"""Graceful shutdown under uvicorn: no request dropped, and out within the grace.

uvicorn's own shutdown (0.55, h11) can drop requests in three ways. Closing the listening socket
makes the kernel reset the connections it had already accepted on the server's behalf, which the
server had not yet taken: their clients get "connection reset by peer". Every connection with no
request in progress is closed at once, including new ones whose request is still on its way or
already in the socket buffer but not yet read: a reset, or "server disconnected without sending a
response". And requests still running when `timeout_graceful_shutdown` runs out are cancelled
and answered 500 (with no timeout, the shutdown waits as long as the slowest request).

`GracefulServer.shutdown` on SIGTERM or SIGINT instead:
1. marks the app as draining, from the signal handler itself (`Drain.begin`): from then on new
   requests are answered 503 + Retry-After + `Connection: close` (api/draining.py);
2. takes every connection waiting in the listening socket's backlog, then closes the socket in
   the same step, so that later attempts are refused by the kernel and nothing accepted is lost;
3. closes connections that sit idle between requests, unless bytes of a request have arrived on
   them (those are answered 503 and closed); a new connection gets up to `NEW_CONNECTION_WAIT_S`
   to send its request;
4. lets the requests in progress finish until `EXPIRE_MARGIN_S` before the grace ends, then has
   the app answer those still running 503 (`Drain.expire`, which does not wait for work running
   in a thread), closes what remains at the end of the grace, and shuts the app down (its
   micro-batchers fail whatever they still hold);
5. ends the process at once, with status 0, without waiting for threads still busy with work
   whose requests were answered 503. Should the event loop be too slow for all that (threads
   competing for the interpreter on a loaded machine), a watchdog thread ends the process at the
   end of the grace all the same, with status 1.

A connection attempt or a request that arrives in the microseconds between the last check and the
close can still be reset: HTTP/1.1 has no way to warn a client that an idle connection is about to
close (RFC 9112, section 9.6), so clients retry such requests, and load balancers stop sending to
a replica once its readiness check (`GET /ready`, 503 while draining) fails.

The protocol must be uvicorn's h11 one: the idle checks read its connection state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Generator
from types import FrameType
from typing import Any

import uvicorn

from .draining import Drain

logger = logging.getLogger("captioner.api")

NEW_CONNECTION_WAIT_S = 2.0  # how long a connection with no request yet may stay silent
EXPIRE_MARGIN_S = 2.0  # left at the end of the grace for the 503s to go out (at most grace / 4)
EXIT_MARGIN_S = 0.25  # left at the very end for the process to exit (at most grace / 10)
POLL_S = 0.02


def _exit_now(status: int) -> None:
    for handler in logger.handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _readable(transport: Any) -> bool:
    """Whether bytes (or the peer's close) wait unread in the connection's socket."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float):
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s
        self.signalled_at: float | None = None  # time.monotonic(), the loop's clock
        self.signalled = False

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        # The server binds its own socket so that shutdown can take the backlog off it.
        super().run(sockets=sockets or [self.config.bind_socket()])

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
            self.signalled = True
            threading.Thread(target=self._watchdog, name="shutdown-watchdog", daemon=True).start()
        self.drain.begin()
        super().handle_exit(sig, frame)

    def _exit_margin(self) -> float:
        return min(EXIT_MARGIN_S, self.grace_s / 10)

    def _watchdog(self) -> None:
        """End the process at the end of the grace if the shutdown has not: the event loop can
        be slowed past it (by threads competing for the interpreter on a loaded machine, by
        synchronous work), and then no coroutine can keep the deadline."""
        assert self.signalled_at is not None
        time.sleep(
            max(0.0, self.signalled_at + self.grace_s - self._exit_margin() - time.monotonic())
        )
        logger.error(
            "grace over before the shutdown finished: exiting now",
            extra={"fields": {"seconds": self._since_signal()}},
        )
        _exit_now(1)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            if self.signalled:
                # Shut down: every request is answered and the app has stopped. End the process
                # now, as uvicorn's re-raised SIGTERM would, without waiting for threads still
                # busy with work whose requests were answered 503 (after SIGINT, asyncio.run's
                # clean-up would wait for them) or for the interpreter's own teardown (half a
                # second or more with PyTorch loaded).
                logger.info("shut down", extra={"fields": {"seconds": self._since_signal()}})
                _exit_now(0)

    def _since_signal(self) -> float:
        return round(time.monotonic() - (self.signalled_at or time.monotonic()), 3)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        if self.signalled_at is None:  # asked to stop without a signal
            self.signalled_at = time.monotonic()
        deadline = self.signalled_at + self.grace_s - 2 * self._exit_margin()  # then the watchdog
        expire_at = self.signalled_at + self.grace_s - min(EXPIRE_MARGIN_S, self.grace_s / 4)
        self.drain.begin()
        backlog = self._stop_accepting(sockets or [])
        logger.info(
            "shutting down",
            extra={
                "fields": {
                    "grace_s": self.grace_s,
                    "requests": len(self.drain.running),
                    "connections": len(self.server_state.connections),
                    "from_backlog": len(backlog),
                }
            },
        )
        for sock in backlog:
            try:
                await loop.connect_accepted_socket(self._protocol, sock)
            except OSError:
                sock.close()

        silent_since: dict[Any, float] = {}
        while not self.force_exit and loop.time() < expire_at:
            self._close_idle(silent_since, loop.time())
            if not self.server_state.connections and not self.server_state.tasks:
                break
            await asyncio.sleep(POLL_S)
        if self.drain.running:
            logger.warning(
                "grace nearly over: answering the requests still running 503",
                extra={"fields": {"requests": self.drain.expire()}},
            )
        while (
            not self.force_exit
            and (self.server_state.connections or self.server_state.tasks)
            and loop.time() < deadline
        ):
            self._close_idle(silent_since, loop.time(), wait_s=0.0)
            await asyncio.sleep(POLL_S)
        for task in self.server_state.tasks:
            task.cancel()
        for connection in list(self.server_state.connections):
            connection.transport.close()

        if not self.force_exit:
            await self.lifespan.shutdown()

    def _stop_accepting(self, sockets: list[socket.socket]) -> list[socket.socket]:
        """Take the connections in the listening sockets' backlogs, then close the sockets,
        with no await in between (the loop accepts nothing more meanwhile)."""
        accepted = []
        for listener in sockets:
            listener.setblocking(False)
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # BlockingIOError: the backlog is empty
                    break
                conn.setblocking(False)
                accepted.append(conn)
        for server in self.servers:
            server.close()
        for listener in sockets:
            listener.close()
        return accepted

    def _protocol(self) -> asyncio.Protocol:
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )

    def _close_idle(
        self, silent_since: dict[Any, float], now: float, wait_s: float = NEW_CONNECTION_WAIT_S
    ) -> None:
        """Close the connections with no request in progress and nothing unread; a new
        connection (no request yet) after `wait_s` of silence."""
        for connection in list(self.server_state.connections):
            cycle = connection.cycle
            if cycle is not None and not cycle.response_complete:
                continue  # a request in progress: its response closes the connection
            if connection.conn.trailing_data[0] or _readable(connection.transport):
                continue  # a request is arriving: it is answered 503, then closed
            if cycle is None and now - silent_since.setdefault(connection, now) < wait_s:
                continue  # connected but silent so far: its request may be on its way
            connection.shutdown()
