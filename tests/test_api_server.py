"""`serve()`: the real uvicorn server on a loopback port, started in a subprocess."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from api.settings import Settings
from tests.api_fixtures import png, save_tiny_captioner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder, **overrides) -> tuple[str, subprocess.Popen]:
    """`serve()` in a subprocess with the tiny captioner and `Settings` overrides, once ready."""
    port = free_port()
    code = (
        "from api.server import serve; "
        f"serve('127.0.0.1', {port}, caption_model={str(folder)!r}, vqa_model='', **{overrides!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return base, proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.terminate()
            _, stderr = proc.communicate(timeout=10)
            raise AssertionError(f"server did not start: {stderr[-2000:]}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.wait(timeout=10)
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


@pytest.fixture
def server(tmp_path):
    base, proc = start(save_tiny_captioner(tmp_path / "cap"))
    try:
        yield base, proc
    finally:
        stop(proc)


def test_serve_answers_over_http_and_logs_json(server):
    base, proc = server
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    response = httpx.post(
        f"{base}/caption?max_length=3", files={"image": ("a.png", png(1), "image/png")}
    )
    assert response.status_code == 200
    assert response.json()["model"]["name"] == "tiny-cap"
    assert httpx.get(f"{base}/ready").json()["models"] == {
        "captioner": "loaded",
        "vqa": "disabled",
    }
    proc.terminate()
    _, stderr = proc.communicate(timeout=10)
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("message") == "request"]
    assert {(r["method"], r["path"], r["status"]) for r in requests} >= {
        ("GET", "/health", 200),
        ("POST", "/caption", 200),
    }
    assert any(line.get("message") == "model loaded" for line in lines)


def idle_connection_survives(base: str, idle_s: float) -> bool:
    """One GET /health on a kept-alive connection, `idle_s` of silence, then whether the same
    connection still answers (False: the server closed it meanwhile)."""
    port = int(base.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        first.read()
        assert first.status == 200 and not first.will_close
        time.sleep(idle_s)
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (ConnectionError, http.client.RemoteDisconnected):
        return False
    finally:
        conn.close()


def test_idle_connections_are_closed_after_keep_alive_s(tmp_path):
    folder = save_tiny_captioner(tmp_path / "cap")
    base, proc = start(folder, keep_alive_s=0.5)
    try:
        assert not idle_connection_survives(base, 1.5)
    finally:
        stop(proc)
    base, proc = start(folder)  # the default keeps it
    try:
        assert idle_connection_survives(base, 1.5)
    finally:
        stop(proc)


def test_default_keep_alive_outlasts_common_client_idle_timeouts():
    # The client (httpx here; a load balancer in production, nginx and AWS ALB: 60 s) must give up
    # on an idle connection first, or a request it sends just as the server closes it is reset.
    default = Settings.model_fields["keep_alive_s"].default
    assert default > 60.0 > httpx.Limits().keepalive_expiry
