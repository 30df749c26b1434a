"""Oversized uploads: does the 413 reach clients that send the whole body before reading?

Starts one `captioner serve` process on 127.0.0.1 (a free port; loopback only) with the demo
models and the default upload cap (CAPTIONER_MAX_UPLOAD_BYTES, 10 MiB), then POSTs a multipart
body with one image of each --sizes (MiB) to /caption, --tries times per client:

  urllib          urllib.request with Content-Length (it sends `Connection: close`)
  urllib-chunked  urllib.request with an iterable body (Transfer-Encoding: chunked)
  socket          a plain socket: the whole request (`Connection: close`) with sendall, then
                  the reply
  httpx           httpx (keeps the connection alive)

A try counts as answered when it gets the 413 with a JSON `detail`; anything else (a reset, a
broken pipe, another status) is printed by kind.

    python bench/oversized_uploads.py [--tries 12] [--sizes 10.2 11 15 30]

Last line: {"answered_413": n, "tries": total, "failures": {kind: count}}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import tempfile
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import httpx
from procs import start_server, stop_server

PIECE = 256 * 1024


def form(size: int) -> tuple[bytes, bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head, f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def pieces(head: bytes, size: int, tail: bytes):
    yield head
    zeros = bytes(PIECE)
    for start in range(0, size, PIECE):
        yield zeros[: min(PIECE, size - start)]
    yield tail


def via_urllib(url: str, size: int, chunked: bool = False) -> tuple[int, str]:
    head, tail, content_type = form(size)
    data = pieces(head, size, tail) if chunked else head + bytes(size) + tail
    request = urllib.request.Request(url + "/caption", data=data, method="POST")
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def via_socket(url: str, size: int) -> tuple[int, str]:
    port = int(url.rsplit(":", 1)[1])
    head, tail, content_type = form(size)
    request = (
        f"POST /caption HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(head) + size + len(tail)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request + head + bytes(size) + tail)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read().decode()


def via_httpx(url: str, size: int) -> tuple[int, str]:
    files = {"image": ("big.png", bytes(size), "image/png")}
    response = httpx.post(url + "/caption", files=files, timeout=60)
    return response.status_code, response.text


CLIENTS = {
    "urllib": via_urllib,
    "urllib-chunked": lambda url, size: via_urllib(url, size, chunked=True),
    "socket": via_socket,
    "httpx": via_httpx,
}


def outcome(client, url: str, size: int) -> str:
    try:
        status, body = client(url, size)
    except (OSError, httpx.TransportError) as error:
        return type(getattr(error, "reason", None) or error).__name__
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        detail = None
    return (
        "413" if status == 413 and isinstance(detail, str) and detail else f"{status} {body[:60]}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=12)
    parser.add_argument("--sizes", type=float, nargs="+", default=[10.2, 11, 15, 30])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp) / "server.log")
        try:
            failures: Counter[str] = Counter()
            answered = total = 0
            for name, client in CLIENTS.items():
                for mib in args.sizes:
                    seen = Counter(
                        outcome(client, url, int(mib * 2**20)) for _ in range(args.tries)
                    )
                    answered += seen.pop("413", 0)
                    total += args.tries
                    failures.update(seen)
                    got = ", ".join(f"{k} x{v}" for k, v in seen.items()) or "-"
                    print(
                        f"{name:15s} {mib:5.1f} MiB: {args.tries - sum(seen.values()):3d} of "
                        f"{args.tries} got the 413; others: {got}",
                        flush=True,
                    )
        finally:
            stop_server(proc)
    print(json.dumps({"answered_413": answered, "tries": total, "failures": dict(failures)}))


if __name__ == "__main__":
    main()
