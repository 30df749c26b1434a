"""Sizing: resident memory and one-client latency of `captioner serve` for each demo model (CPU).

For each setup (no model, each demo model alone, both default models) it starts a loopback server,
waits for /ready, reads the process's resident set (VmRSS) and, for the one-model setups, sends
`--requests` requests one after another (after `--warmup` unmeasured ones): `POST /caption` with
the defaults (beam 3, attention grid) or `POST /vqa` ("what color is the circle?", top 3,
attention grid), each with a new 128 px shapes scene, so the VQA feature cache never hits. The
peak resident set (VmHWM) is read at the end. One JSON line per setup.

    python bench/sizing.py [--requests 60] [--warmup 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
from procs import free_port, proc_mib

from captioner.data.shapes import make_scene, render
from captioner.paths import MODELS_DIR

SETUPS = [  # (label, caption model, VQA model, route to time)
    ("no model", "", "", None),
    ("shapes-captioner", "shapes-captioner", "", "/caption"),
    ("shapes-vqa", "", "shapes-vqa", "/vqa"),
    ("easy-vqa", "", "easy-vqa", "/vqa"),
    ("both default models", "shapes-captioner", "shapes-vqa", None),
]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=60, help="measured requests per model")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured requests first")
    return p


def scenes(n: int, first_seed: int = 1000) -> list[bytes]:
    out = []
    for seed in range(first_seed, first_seed + n):
        buf = io.BytesIO()
        render(make_scene(seed, size=128)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def measure(label: str, caption: str, vqa: str, route: str | None, args) -> dict:
    port = free_port()
    env = dict(os.environ, CAPTIONER_API_KEY="", CAPTIONER_DEVICE="cpu")
    env["CAPTIONER_CAPTION_MODEL"] = str(MODELS_DIR / caption) if caption else ""
    env["CAPTIONER_VQA_MODEL"] = str(MODELS_DIR / vqa) if vqa else ""
    command = [sys.executable, "-m", "api.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.perf_counter()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            probe = "/ready" if caption or vqa else "/health"
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{label}: the server exited ({proc.returncode})")
                try:
                    if client.get(probe).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            result = {
                "setup": label,
                "ready_s": round(time.perf_counter() - started, 1),
                "rss_mib": round(proc_mib(proc.pid, "VmRSS")),
            }
            latencies = []
            for i, image in enumerate(scenes(args.warmup + args.requests) if route else []):
                files = {"image": ("scene.png", image, "image/png")}
                data = {"question": "what color is the circle?"} if route == "/vqa" else None
                t = time.perf_counter()
                response = client.post(route, files=files, data=data)
                elapsed_ms = (time.perf_counter() - t) * 1000
                response.raise_for_status()
                if i >= args.warmup:
                    latencies.append(elapsed_ms)
            result["peak_rss_mib"] = round(proc_mib(proc.pid, "VmHWM"))
        if latencies:
            latencies.sort()
            result.update(
                route=route,
                p50_ms=round(statistics.median(latencies), 1),
                p95_ms=round(latencies[max(0, round(0.95 * len(latencies)) - 1)], 1),
            )
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(args: argparse.Namespace) -> list[dict]:
    results = []
    for setup in SETUPS:
        results.append(measure(*setup, args))
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
