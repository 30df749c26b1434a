"""What the benchmarks that start a real server share: a free loopback port, the service's memory
and CPU time from /proc (the server process and those it started), starting the service until it
is ready, and a graceful stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (field 3 first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def service_pids(pid: int) -> list[int]:
    """`pid` and every process under it (the captioner's own process, multiprocessing's
    resource tracker): the service's whole footprint."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents.setdefault(int(_stat(int(stat.parent.name))[1]), []).append(
                int(stat.parent.name)
            )
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += parents.get(found[-1], [])
    return found


def proc_mib(pid: int, key: str) -> float:
    """A /proc/<pid>/status field given in kB (VmRSS: resident now, VmHWM: peak), in MiB, summed
    over `pid` and the processes under it (peaks summed: at most the service's peak)."""
    total = 0
    for each in service_pids(pid):
        try:
            lines = Path(f"/proc/{each}/status").read_text().splitlines()
        except FileNotFoundError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith(key + ":"))
    return total / 1024 if total else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far (/proc/<pid>/stat, fields 14 and 15) of `pid` and the
    processes under it."""
    ticks = 0
    for each in service_pids(pid):
        try:
            fields = _stat(each)
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_server(log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`captioner serve` on a free loopback port, its output in `log`; (process, base URL) once
    GET /ready answers 200 (within 120 s, else the log's tail in the error)."""
    port = free_port()
    command = [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    raise RuntimeError(f"the server did not get ready:\n{log.read_text()[-2000:]}")
