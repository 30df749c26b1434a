"""The captioner in a process of its own, so that the event loop's Python never holds it up.

    model = CaptionerProcess.start(path, device="cpu")  # returns once loaded
    results = model.caption_batch(pixels, [(3, 20)] * len(pixels), [False] * len(pixels))
    model.close()

Why a process: in the service's own process the batcher's worker thread needs the GIL between
every two torch operations of a search (tens a step), and the event loop holds it for about a
millisecond per request (HTTP, multipart, routing, JSON). Under load the model thread spent 14-27%
of each batch waiting for it (bench/serve.py). A child process has a GIL of its own: the parent's
worker thread only sends the batch and waits on the pipe.

The child is started with `spawn` (forking a process that runs threads, or CUDA, is unsafe),
loads the model, and answers one batch at a time: ("batch", pixels (B, 3, S, S) as a numpy array,
options, streamed) -> ("words", row, [CaptionWord, ...]) for each streamed image's words as its
search fixes them, then ("done", [CaptionResult, ...]) or ("error", exception). Which streamed
images are still wanted is a shared array of flags the parent keeps up to date while it waits
(an image nobody wants may so run a step or two longer than it would in the parent's process).
The child ignores SIGINT and SIGTERM (they are the parent's to handle: a graceful shutdown lets
running batches finish), and ends when the parent sends None or its end of the pipe closes, so it
never outlives the service. A child that dies fails the batch it was running (RuntimeError) and
is started again for the next one; so is a child whose batch the parent gave up mid-way (a
listener that raised), since the pipe still holds that batch's messages.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import pickle
import signal
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from captioner.results import CaptionResult, CaptionWord

from .caption_work import Listeners, caption_batch

logger = logging.getLogger("captioner.api")

POLL_S = 0.01  # the waiting parent copies its streams' stop flags to the child at least this often
START_TIMEOUT_S = 300.0  # loading a large model on a busy machine
STOP_TIMEOUT_S = 5.0


class ModelProcessError(RuntimeError):
    """The model process failed to start, or ended while it ran a batch."""


class CaptionerProcess:
    """The parent's handle on a captioner loaded in a child process: the captioner's name,
    version, input size and metadata, and `caption_batch` (`api.caption_work.caption_batch`) run
    there. Call it from one thread at a time (the batcher's worker)."""

    def __init__(self, path: Path, max_rows: int, load: dict[str, Any]):
        self._path = str(path)
        self._load = load  # Captioner.load's keyword arguments
        self._context = multiprocessing.get_context("spawn")
        self._wanted = self._context.RawArray(ctypes.c_bool, max_rows)
        self._process: Any = None
        self._conn: Connection | None = None
        self.info: dict[str, Any] = {}

    @classmethod
    def start(cls, path: str | Path, max_rows: int = 64, **load: Any) -> CaptionerProcess:
        """Start the child and wait until it has loaded the model with `Captioner.load(path,
        **load)` (device, quantize, fuse_attention); its error if that fails."""
        model = cls(Path(path), max_rows, load)
        model._spawn()
        return model

    # -- what the service reads ------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def version(self) -> str:
        return self.info["version"]

    @property
    def input_size(self) -> int:
        return self.info["input_size"]

    @property
    def quantize(self) -> str | None:
        return self.info["quantize"]

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def metadata(self) -> dict[str, Any]:
        return dict(self.info["metadata"])

    # -- work ------------------------------------------------------------------------------------
    def caption_batch(
        self,
        pixels: torch.Tensor,
        options: Sequence[tuple[int, int]],
        streamed: Sequence[bool] = (),
        listeners: Listeners | None = None,
    ) -> list[CaptionResult]:
        """As `api.caption_work.caption_batch`, in the child; `listeners` hear the words here."""
        if len(options) > len(self._wanted):
            raise ValueError(f"{len(options)} images; this model process takes {len(self._wanted)}")
        streamed = list(streamed) or [False] * len(options)
        if self._conn is None:  # the last child died: a new one for this batch
            self._spawn()
        assert self._conn is not None
        for row in range(len(options)):
            self._wanted[row] = True
        try:
            self._conn.send(("batch", pixels.cpu().numpy(), list(options), streamed))
            while True:
                if listeners is not None:
                    for row in range(len(options)):
                        self._wanted[row] = listeners.wanted(row)
                if not self._conn.poll(POLL_S):
                    continue
                kind, *payload = self._conn.recv()
                if kind == "words":
                    row, words = payload
                    if listeners is not None:
                        listeners.words(row, words)
                elif kind == "done":
                    return payload[0]
                else:  # the batch failed in the child, which goes on: raised below
                    failure = payload[0]
                    break
        except (EOFError, OSError) as exc:
            code = self._reap()
            logger.error(
                "model process ended while captioning",
                extra={"fields": {"exit_code": code, "images": len(options)}},
            )
            raise ModelProcessError(
                f"the model process ended while captioning (exit code {code}); "
                "a new one starts for the next batch"
            ) from exc
        except BaseException:  # here, mid-batch (a listener failed): the pipe holds the rest of
            self._reap()  # that batch's messages, so this child goes; a new one takes the next
            raise
        raise failure

    def close(self) -> None:
        """Ask the child to end; kill it if it has not within STOP_TIMEOUT_S."""
        if self._conn is not None:
            with contextlib.suppress(OSError):  # it died already
                self._conn.send(None)
        self._reap(STOP_TIMEOUT_S)

    # -- the child's life ------------------------------------------------------------------------
    def _spawn(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_serve,
            args=(child, self._path, self._load, self._wanted),
            name="captioner-model",
            daemon=True,  # ended with the service, whatever happens to it
        )
        process.start()
        child.close()  # the child's end lives in the child only: EOF here when it dies
        self._process, self._conn = process, parent
        if not parent.poll(START_TIMEOUT_S):
            self._reap()
            raise ModelProcessError(f"the model process did not load {self._path} in time")
        try:
            kind, payload = parent.recv()
        except EOFError:
            code = self._reap()
            raise ModelProcessError(
                f"the model process ended while loading (exit code {code})"
            ) from None
        if kind != "ready":
            self._reap()
            raise payload
        self.info = payload
        logger.info(
            "model process started", extra={"fields": {"pid": process.pid, "path": self._path}}
        )

    def _reap(self, timeout: float = 0.0) -> int | None:
        """Forget the child: wait up to `timeout` for it to end, else kill it; its exit code."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
        return process.exitcode


class _Relay(Listeners):
    """The child's listeners: words go to the parent; `wanted` reads the parent's flags."""

    def __init__(self, conn: Connection, wanted: Any):
        self.conn, self._wanted = conn, wanted

    def words(self, row: int, words: list[CaptionWord]) -> None:
        self.conn.send(("words", row, words))

    def wanted(self, row: int) -> bool:
        return bool(self._wanted[row])


def _picklable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _serve(conn: Connection, path: str, load: dict[str, Any], wanted: Any) -> None:
    """The child: load the captioner, then caption each batch the parent sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from captioner.caption.captioner import Captioner

    try:
        captioner = Captioner.load(path, **load)
    except Exception as exc:
        conn.send(("failed", _picklable(exc)))
        return
    info = {
        "name": captioner.name,
        "version": captioner.version,
        "input_size": captioner.input_size,
        "metadata": captioner.metadata(),
        "quantize": captioner.quantize,
    }
    conn.send(("ready", info))
    relay = _Relay(conn, wanted)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        _, pixels, options, streamed = message
        try:
            results = caption_batch(captioner, torch.from_numpy(pixels), options, streamed, relay)
        except Exception as exc:
            conn.send(("error", _picklable(exc)))
        else:
            conn.send(("done", results))
