"""The app's side of a graceful shutdown (api/draining.py): once draining, new requests get 503
+ Retry-After + `Connection: close`; running ones finish, or get 503 when the grace runs out.
(tests/test_api_shutdown.py drives the real server with signals.)"""

from __future__ import annotations

import threading
import time

import pytest

from api.app import create_app
from tests.api_fixtures import (
    TestClient,
    assert_error,
    gate_captioner,
    png,
    save_tiny_captioner,
    settings,
    upload,
)


@pytest.fixture
def client(tmp_path):
    app = create_app(settings(caption_model=save_tiny_captioner(tmp_path / "cap")))
    with TestClient(app) as client:
        yield client


def caption(client):
    return client.post("/caption?max_length=3", files=upload(png(1)))


def start_held_request(client) -> tuple[threading.Thread, dict, object]:
    """A /caption request whose model pass waits at the gate; returns once it is running."""
    gated = gate_captioner(client)
    responses = {}
    thread = threading.Thread(target=lambda: responses.setdefault("held", caption(client)))
    thread.start()
    assert gated.entered.wait(10)
    return thread, responses, gated


def test_new_requests_are_refused_while_draining_but_health_answers(client):
    assert caption(client).status_code == 200
    client.app.state.drain.begin()
    refused = caption(client)
    assert "shutting down" in assert_error(refused, 503)
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.headers["Connection"] == "close"
    assert_error(client.get("/ready"), 503)  # load balancers stop sending here
    assert client.get("/health").status_code == 200  # the process is alive


def test_a_running_request_finishes_with_connection_close(client):
    thread, responses, gated = start_held_request(client)
    client.app.state.drain.begin()
    assert_error(caption(client), 503)  # meanwhile, a new one is refused
    gated.gate.set()
    thread.join(20)
    assert responses["held"].status_code == 200
    assert responses["held"].headers["Connection"] == "close"


def test_requests_still_running_when_the_grace_ends_get_503(client):
    thread, responses, gated = start_held_request(client)
    queued = threading.Thread(target=lambda: responses.setdefault("queued", caption(client)))
    queued.start()  # waits behind the held one in the micro-batcher's queue
    batcher = client.app.state.services["captioner"].batcher
    deadline = time.monotonic() + 10
    while batcher.depth < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    drain = client.app.state.drain
    drain.begin()
    assert client.portal.call(drain.expire) == 2
    for t in (thread, queued):
        t.join(20)
    for name in ("held", "queued"):
        assert "shutting down" in assert_error(responses[name], 503)
        assert int(responses[name].headers["Retry-After"]) > 0
    assert batcher.depth == 0  # the queued item was dropped, not left for the model
    gated.gate.set()


def test_a_request_busy_in_a_thread_is_answered_without_waiting_for_it(client, monkeypatch):
    """Work in a worker thread (decoding, drawing overlays) cannot be cancelled until it returns:
    the 503 goes out at once all the same."""
    import api.uploads

    entered, gate = threading.Event(), threading.Event()
    decode = api.uploads.decode_image

    def slow_decode(*args):
        entered.set()
        gate.wait(30)
        return decode(*args)

    monkeypatch.setattr(api.uploads, "decode_image", slow_decode)
    responses = {}
    thread = threading.Thread(target=lambda: responses.setdefault("held", caption(client)))
    thread.start()
    assert entered.wait(10)
    drain = client.app.state.drain
    drain.begin()
    assert client.portal.call(drain.expire) == 1
    thread.join(10)
    assert not thread.is_alive(), "the answer waited for the thread"
    assert "shutting down" in assert_error(responses["held"], 503)
    gate.set()
