"""Oversized uploads get their 413 over real sockets, even from clients that send the whole body
before reading the reply (urllib, a plain socket), and a client that never stops sending is cut
off at the bound (api/linger.py). One uvicorn subprocess serves the whole module."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.api_fixtures import png, save_tiny_captioner, save_tiny_vqa
from tests.api_process import start_server, stop

LINGER_MAX_BYTES = 32 * 1024 * 1024  # above the largest body below, so each one is read to its end
LINGER_S = 2.0
SIZES = {"11MB": 11_000_000, "30MB": 30_000_000}
ROUTES = ["/caption", "/caption/batch", "/vqa"]
REPEATS = 5
PIECE = 256 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    server = start_server(
        tmp_path_factory.mktemp("log"),
        caption_model=save_tiny_captioner(models / "cap"),
        vqa_model=save_tiny_vqa(models / "vqa"),
        settings={
            "max_batch_images": 2,  # /caption/batch: 11 MB fits its body limit, 30 MB does not
            "linger_max_bytes": LINGER_MAX_BYTES,
            "linger_s": LINGER_S,
        },
    )
    try:
        yield server
    finally:
        stop(server)


def form(route: str, size: int) -> tuple[bytes, bytes, str]:
    """A multipart body with one `size`-byte image (and a question for /vqa), cut as
    (head, tail) around the image bytes, and its content type."""
    boundary = uuid.uuid4().hex
    head = b""
    if route == "/vqa":
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="question"\r\n\r\n'
            "what color is the circle?\r\n"
        ).encode()
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head, tail, f"multipart/form-data; boundary={boundary}"


def pieces(head: bytes, size: int, tail: bytes) -> Iterator[bytes]:
    yield head
    zeros = bytes(PIECE)
    for start in range(0, size, PIECE):
        yield zeros[: min(PIECE, size - start)]
    yield tail


def urllib_post(url: str, route: str, size: int, chunked: bool) -> tuple[int, dict, str]:
    head, tail, content_type = form(route, size)
    data = pieces(head, size, tail) if chunked else head + bytes(size) + tail
    request = urllib.request.Request(url + route, data=data, method="POST")
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def socket_post(port: int, route: str, size: int, chunked: bool) -> tuple[int, dict, str]:
    """The whole request written with `sendall`, then the reply read: no reading while sending."""
    head, tail, content_type = form(route, size)
    framing = (
        "Transfer-Encoding: chunked"
        if chunked
        else f"Content-Length: {len(head) + size + len(tail)}"
    )
    request_head = (
        f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"{framing}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request_head)
        for piece in pieces(head, size, tail):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, dict(response.headers), response.read().decode()


CLIENTS = {"urllib": urllib_post, "socket": socket_post}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_oversized_uploads_get_413_from_clients_that_send_everything_first(server, client, framing):
    """Every route, both sizes, 5 times each: the 413 with its JSON detail, never a reset."""
    outcomes = {}
    for route in ROUTES:
        for name, size in SIZES.items():
            seen = []
            for _ in range(REPEATS):
                target = server.base if client == "urllib" else server.port
                try:
                    status, headers, body = CLIENTS[client](
                        target, route, size, framing == "chunked"
                    )
                    detail = json.loads(body)["detail"]
                    seen.append(status if isinstance(detail, str) and detail else "no detail")
                except OSError as error:  # urllib wraps resets in URLError, an OSError
                    seen.append(type(getattr(error, "reason", error)).__name__)
            outcomes[f"{route} {name}"] = seen
    wrong = {case: seen for case, seen in outcomes.items() if seen != [413] * REPEATS}
    assert not wrong, "\n".join(f"{case}: {dict(Counter(seen))}" for case, seen in wrong.items())
    assert httpx.get(f"{server.base}/health").status_code == 200


def endless_send(port: int, head: bytes, piece: bytes, pause_s: float) -> tuple[int, float]:
    """Send `head`, then `piece` after `piece` until the server cuts the connection; returns the
    body bytes it took and the seconds until the cut."""
    sent, started = 0, time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        try:
            while time.monotonic() - started < 60:
                sock.sendall(piece)
                sent += len(piece)
                if pause_s:
                    time.sleep(pause_s)
            raise AssertionError(f"the server took {sent} bytes in 60 s without cutting them off")
        except (BrokenPipeError, ConnectionResetError):
            return sent, time.monotonic() - started


def test_a_client_that_never_stops_sending_is_cut_off_at_the_byte_bound(server):
    head = (
        b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000000000\r\n\r\n"  # keep-alive: the server must close it itself
    )
    sent, _ = endless_send(server.port, head, bytes(PIECE), pause_s=0)
    # What the server read, plus what the two kernels' socket buffers held when it closed.
    assert LINGER_MAX_BYTES <= sent < LINGER_MAX_BYTES + 16 * 1024 * 1024
    response = httpx.post(f"{server.base}/caption?max_length=3", files={"image": ("a.png", png(1))})
    assert response.status_code == 200


def test_a_client_that_trickles_for_ever_is_cut_off_at_the_time_bound(server):
    head = (
        b"POST /vqa HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"%x\r\n%s\r\n" % (64 * 1024, bytes(64 * 1024))
    # Enough at once to pass the body limit (10 MiB + framing), then a trickle.
    head += piece * 170
    sent, seconds = endless_send(server.port, head, b"1\r\n\0\r\n", pause_s=0.02)
    assert LINGER_S <= seconds < LINGER_S + 10
    assert httpx.get(f"{server.base}/health").status_code == 200
