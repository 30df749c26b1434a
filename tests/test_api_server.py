"""`serve()`: the real uvicorn server on a loopback port, started in a subprocess."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.api_fixtures import png, save_tiny_captioner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    folder = save_tiny_captioner(tmp_path / "cap")
    port = free_port()
    code = (
        "from api.server import serve; "
        f"serve('127.0.0.1', {port}, caption_model={str(folder)!r}, vqa_model='')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {proc.communicate()[1][-2000:]}")
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=10)


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
