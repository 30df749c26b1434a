"""The real service under uvicorn in a subprocess, for tests that need real sockets and signals.

    server = start_server(caption_model=folder, vqa_model=vqa_folder, settings={"linger_s": 1})
    ...
    stop(server)

`prelude` is Python run in the subprocess before `serve()` (e.g. to slow the model down).
The subprocess writes its log to a file (not a pipe that nobody reads while it runs).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    log_dir: Path,
    caption_model: Path | str = "",
    vqa_model: Path | str = "",
    settings: dict[str, Any] | None = None,
    prelude: str = "",
    timeout_s: float = 60,
) -> ServerProcess:
    """`serve()` on a free loopback port in a subprocess; returns once `/ready` answers 200.
    The captioner runs in the server's own process (a `prelude` can patch it there) unless
    `settings` says model_process=True."""
    port = free_port()
    settings = {"model_process": False, **(settings or {})}
    code = (
        f"{prelude}\n"
        "from api.server import serve\n"
        f"serve('127.0.0.1', {port}, caption_model={str(caption_model)!r}, "
        f"vqa_model={str(vqa_model)!r}, **{settings!r})\n"
    )
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{server.base}/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(server)
            raise AssertionError(f"server did not start: {server.log()[-3000:]}")
        time.sleep(0.1)


def stop(server: ServerProcess, timeout_s: float = 30) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
    try:
        server.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
