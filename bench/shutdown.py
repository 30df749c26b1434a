"""Graceful shutdown under load: what requests in flight at SIGINT / SIGTERM get, and how long the
process takes to go.

Starts one `captioner serve` process on 127.0.0.1 (a free port; loopback only) with the demo
models, sends --burst concurrent requests (alternating /caption and /vqa at beam_size 10,
max_length 50, attention=png; each on a new connection), and the signal --lead seconds after the
first. With --stall S the server process is stopped (SIGSTOP) for the last S seconds before the
signal (from before the burst if S > lead), as on a loaded machine where it gets no CPU: the
kernel completes the handshakes and buffers the requests meanwhile. With --load N, N busy
processes run beside it throughout. --photo-mb sends a noisy PNG of about that many MB (a large
photo) in place of the 128 px scene.

Each request ends as 200, 503 (with Retry-After), 504 (its timeout), refused (the connection
attempt was refused: clean), or the error it got (a reset, "server disconnected without sending
a response", no answer within 120 s).

    python bench/shutdown.py [--signal INT|TERM] [--burst 40] [--lead 0.4] [--stall 0]
                             [--load 0] [--photo-mb 0] [--grace 20]

Last line: {"outcomes": {outcome: count}, "dropped": requests with neither a status nor a clean
refusal, "exit_s": seconds from the signal to the process's exit}.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw
from procs import start_server, stop_server

QUESTION = "what color is the circle?"


def scene() -> bytes:
    """A 128 px picture in the demo models' domain: a red circle and a blue square."""
    image = Image.new("RGB", (128, 128), (20, 20, 30))
    draw = ImageDraw.Draw(image)
    draw.ellipse((16, 40, 56, 80), fill=(220, 30, 30))
    draw.rectangle((76, 44, 112, 80), fill=(30, 60, 220))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def photo(mb: float) -> bytes:
    """A PNG of random pixels (it does not compress) of about `mb` MB."""
    side = int((mb * 1_000_000 / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def burn(stop) -> None:  # in its own process, until `stop` (a multiprocessing.Event) is set
    while not stop.is_set():
        sum(range(10_000))


def refused(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, ConnectionRefusedError):
            return True
        error = error.__cause__ or error.__context__
    return False


def request(client: httpx.Client, url: str, index: int, image: bytes) -> str:
    files = {"image": ("image.png", image, "image/png")}
    try:
        if index % 2 == 0:
            query = "beam_size=10&max_length=50&attention=png"
            response = client.post(f"{url}/caption?{query}", files=files)
        else:
            query = "top_k=10&attention=png"
            response = client.post(f"{url}/vqa?{query}", files=files, data={"question": QUESTION})
    except httpx.TransportError as error:
        return "refused" if refused(error) else f"{type(error).__name__}: {error}"
    if response.status_code == 503 and int(response.headers.get("retry-after", "0")) > 0:
        return "503"
    return str(response.status_code)


def start(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "CAPTIONER_SHUTDOWN_GRACE_S": str(args.grace), "CAPTIONER_API_KEY": ""}
    return start_server(log, env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--signal", choices=["INT", "TERM"], default="INT")
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--lead", type=float, default=0.4, help="seconds from burst to signal")
    parser.add_argument("--stall", type=float, default=0.0, help="seconds stopped before it")
    parser.add_argument("--load", type=int, default=0, help="busy processes beside the server")
    parser.add_argument("--photo-mb", type=float, default=0.0)
    parser.add_argument("--grace", type=float, default=20.0, help="CAPTIONER_SHUTDOWN_GRACE_S")
    args = parser.parse_args(argv)
    image = photo(args.photo_mb) if args.photo_mb else scene()
    stop_burners = multiprocessing.Event()
    burners = [
        multiprocessing.Process(target=burn, args=(stop_burners,), daemon=True)
        for _ in range(args.load)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc, url = start(args, log)
        try:
            with httpx.Client() as warm:  # each model once, so the burst meets warm models
                request(warm, url, 0, scene())
                request(warm, url, 1, scene())
            for burner in burners:
                burner.start()
            clients = [httpx.Client(timeout=120) for _ in range(args.burst)]
            outcomes: list[str | None] = [None] * args.burst
            go = threading.Barrier(args.burst + 1)

            def one(i: int) -> None:
                go.wait()
                outcomes[i] = request(clients[i], url, i, image)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(args.burst)]
            for thread in threads:
                thread.start()
            stop_at = args.lead - args.stall
            if stop_at < 0:
                proc.send_signal(signal.SIGSTOP)
            go.wait()
            started = time.monotonic()
            if stop_at >= 0:
                time.sleep(stop_at)
                if args.stall:
                    proc.send_signal(signal.SIGSTOP)
            time.sleep(max(0.0, started + args.lead - time.monotonic()))
            signalled = time.monotonic()
            proc.send_signal(getattr(signal, f"SIG{args.signal}"))
            proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout=120)
                exit_s = round(time.monotonic() - signalled, 2)
            except subprocess.TimeoutExpired:
                exit_s = None  # still running 120 s after the signal
            for thread in threads:
                thread.join(130)
            for client in clients:
                client.close()
        finally:
            stop_burners.set()
            for burner in burners:
                burner.join(5)
            stop_server(proc)
        shutdown_log = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if any(f'"message": "{m}' in line for m in ("shutting down", "grace", "shut down"))
        ]
    counts = Counter(outcome or "no answer within 120 s" for outcome in outcomes)
    dropped = sum(n for outcome, n in counts.items() if outcome not in ("200", "503", "refused"))
    what = f"{args.photo_mb:g} MB photo" if args.photo_mb else "scene"
    print(
        f"{args.burst} requests ({what}), SIG{args.signal} {args.lead} s after the burst, stalled {args.stall} s, "
        f"{args.load} busy processes beside, grace {args.grace} s"
    )
    for outcome, n in counts.most_common():
        print(f"  {n:3d}  {outcome}")
    print(f"exit {exit_s} s after the signal")
    for line in shutdown_log:  # the server's own account (the service's, not uvicorn's, lines)
        print("  server:", line)
    print(json.dumps({"outcomes": dict(counts), "dropped": dropped, "exit_s": exit_s}))


if __name__ == "__main__":
    main()
