"""The service under load: throughput and latency of `POST /caption` with micro-batching on and off.

Starts two `captioner serve` processes on 127.0.0.1 (free ports; loopback only), one with
CAPTIONER_MAX_BATCH_SIZE=16 and one with =1, and drives each in turn with N concurrent clients
sending real JPEGs (shapes-world scenes, or the coco-mini photos) for T seconds in all, split into
alternating rounds so that other jobs on a shared machine weigh on both modes alike.

The model is the demo captioner `models/shapes-captioner/` when present, else a stand-in of the
architecture the demo is trained with (small CNN at 128 px pooled to an 8x8 grid, LSTM 256 with
soft attention, learned cell positions), random weights and `<end>` suppressed, so that every
caption runs to `max_length` (20 words by default; a trained model's shapes captions are about 10,
so the stand-in's figures are pessimistic).

    python bench/serve.py [--clients 16] [--seconds 20] [--rounds 4] [--images shapes|coco]

Peak memory is each server process's VmHWM (peak resident set) from /proc. Last line:
{"batching_speedup", "errors", "on": {"rps", "p50_ms", "p95_ms", "p99_ms", "peak_rss_mb"}, "off": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from procs import cpu_seconds, free_port, proc_mib, stop_server

from captioner.caption.caption_net import CaptionNet
from captioner.caption.captioner import Captioner
from captioner.data.shapes import generate_split, render
from captioner.encoder import EncoderConfig
from captioner.paths import DEFAULT_CAPTION_MODEL
from captioner.vocab import Vocabulary

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini" / "images"
MODES = {"on": 16, "off": 1}  # CAPTIONER_MAX_BATCH_SIZE


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=20.0, help="measured time per mode (max 120)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured load before measuring")
    p.add_argument("--rounds", type=int, default=4, help="alternating on/off rounds")
    p.add_argument("--images", choices=("shapes", "coco"), default="shapes")
    p.add_argument("--model", type=Path, default=None, help="captioner folder (default: the demo)")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--attention", choices=("none", "grid", "png"), default="grid")
    p.add_argument("--modes", default="on,off", help="which of on,off to run")
    return p


# -- the model and the images -----------------------------------------------------------------------


def stand_in_model(folder: Path) -> Path:
    """A captioner of the demo's size and architecture: random weights, no `<end>`."""
    torch.manual_seed(0)
    scenes = generate_split(300, seed=123)
    vocab = Vocabulary.build(c for s in scenes for c in s.captions)
    model = CaptionNet.build(
        EncoderConfig(name="small_cnn", input_size=128, grid_size=8, width=32),
        vocab_size=len(vocab),
        embed_dim=128,
        hidden_dim=256,
        attention_dim=128,
        positional=True,
        dropout=0.0,
    ).eval()
    with torch.no_grad():
        # Random weights give flat word distributions where <end> may win at once; suppress it so
        # that every caption costs the full `max_length` decoding steps (a worst case).
        model.decoder.out.bias[Vocabulary.end_id] = -30.0
    captioner = Captioner(model, vocab, name="stand-in", version="0")
    return captioner.save(folder, training={"note": "random weights, for benchmarking only"})


def jpegs(kind: str, n: int = 64) -> list[bytes]:
    if kind == "coco":
        files = sorted(COCO_MINI.glob("*.jpg"))[:n]
        if not files:
            raise ValueError(f"no coco-mini photos in {COCO_MINI}; use --images shapes")
        return [f.read_bytes() for f in files]
    out = []
    for scene in generate_split(n, seed=2024):
        buf = io.BytesIO()
        render(scene).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# -- the server -------------------------------------------------------------------------------------


def start_server(
    model: Path, batch_size: int, clients: int, log: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        CAPTIONER_MAX_BATCH_SIZE=str(batch_size),
        CAPTIONER_MAX_QUEUE=str(max(64, 4 * clients)),
        CAPTIONER_API_KEY="",
        CAPTIONER_DEVICE="cpu",
    )
    command = [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--caption-model", str(model), "--vqa-model", ""]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"the server was not ready within 120 s:\n{log.read_text()[-2000:]}")


# -- the clients ------------------------------------------------------------------------------------


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    words: list[int] = field(default_factory=list)  # caption length of each success
    errors: int = 0  # non-200 answers and failed connections
    wall: float = 0.0


async def drive(url: str, images: list[bytes], args, seconds: float) -> Load:
    """`args.clients` clients, each posting images back to back for `seconds`."""
    load = Load()
    params = {"beam_size": args.beam_size, "max_length": args.max_length}
    params["attention"] = args.attention
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def one_client(index: int) -> None:
            i = index
            while time.perf_counter() < deadline:
                data = images[i % len(images)]
                i += args.clients
                t0 = time.perf_counter()
                try:
                    response = await client.post(
                        "/caption", params=params, files={"image": ("a.jpg", data, "image/jpeg")}
                    )
                    words = len(response.json()["tokens"]) if response.status_code == 200 else -1
                except (httpx.HTTPError, ValueError, KeyError):
                    words = -1
                if words >= 0:
                    load.latencies.append(time.perf_counter() - t0)
                    load.words.append(words)
                else:
                    load.errors += 1

        await asyncio.gather(*(one_client(i) for i in range(args.clients)))
        load.wall = time.perf_counter() - start
    return load


def batch_counts(url: str) -> tuple[float, float]:
    """(images, batches) the captioner has run so far, from the server's Prometheus histogram."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for key in values:
            if line.startswith(f"captioner_batch_size_{key}{{") and 'model="captioner"' in line:
                values[key] = float(line.rsplit(" ", 1)[1])
    return values["sum"], values["count"]


@dataclass
class Mode:
    name: str
    proc: subprocess.Popen
    url: str
    load: Load = field(default_factory=Load)
    images: float = 0.0  # images and batches the model ran while measured
    batches: float = 0.0
    server_cpu: float = 0.0  # seconds

    def measure(self, images: list[bytes], args, seconds: float) -> None:
        before, cpu = batch_counts(self.url), cpu_seconds(self.proc.pid)
        load = asyncio.run(drive(self.url, images, args, seconds))
        after = batch_counts(self.url)
        self.server_cpu += cpu_seconds(self.proc.pid) - cpu
        self.images += after[0] - before[0]
        self.batches += after[1] - before[1]
        self.load.latencies += load.latencies
        self.load.words += load.words
        self.load.errors += load.errors
        self.load.wall += load.wall

    def result(self) -> dict:
        load = self.load
        ms = np.array(load.latencies) * 1000.0 if load.latencies else np.array([float("nan")])
        done = len(load.latencies)
        return {
            "rps": round(done / load.wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "peak_rss_mb": round(proc_mib(self.proc.pid, "VmHWM"), 1),
            "requests": done,
            "errors": load.errors,
            "mean_batch": round(self.images / self.batches, 2) if self.batches else float("nan"),
            "mean_words": round(float(np.mean(load.words)), 1) if load.words else float("nan"),
            "server_cpu_ms_per_request": round(1000 * self.server_cpu / done, 1) if done else None,
        }


def run(model: Path, images: list[bytes], args, names: list[str], tmp: Path) -> dict[str, dict]:
    """Both servers up at once; measured in alternating rounds, so that a change in the machine's
    other load during the run falls on both modes alike."""
    modes: list[Mode] = []
    try:
        for name in names:
            proc, url = start_server(model, MODES[name], args.clients, tmp / f"server-{name}.log")
            modes.append(Mode(name, proc, url))
        for mode in modes:
            asyncio.run(drive(mode.url, images, args, args.warmup))
        for round_ in range(args.rounds):
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                mode.measure(images, args, args.seconds / args.rounds)
        return {mode.name: mode.result() for mode in modes}
    finally:
        for mode in modes:
            stop_server(mode.proc)


# -- main -------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    if not 1 <= args.clients <= 256:
        raise ValueError(f"--clients must be in 1..256, got {args.clients}")
    if not 0 < args.seconds <= 120:
        raise ValueError(f"--seconds must be in (0, 120], got {args.seconds}")
    if not 1 <= args.rounds <= 20:
        raise ValueError(f"--rounds must be in 1..20, got {args.rounds}")
    names = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not names or any(m not in MODES for m in names) or len(set(names)) < len(names):
        raise ValueError(f"--modes must name on and/or off once each, got {args.modes!r}")

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or DEFAULT_CAPTION_MODEL
        if args.model is None and not (model / "config.json").exists():
            model = stand_in_model(tmp / "stand-in")
            print(f"model: stand-in (no demo model at {DEFAULT_CAPTION_MODEL}); {describe(model)}")
        else:
            print(f"model: {model}; {describe(model)}")
        images = jpegs(args.images)
        mean_kb = sum(map(len, images)) / len(images) / 1024
        print(f"images: {len(images)} {args.images} JPEGs, {mean_kb:.1f} KB on average")
        print(
            f"load: {args.clients} clients, {args.seconds:g} s per mode in {args.rounds} "
            f"alternating rounds after {args.warmup:g} s warm-up; beam_size={args.beam_size} "
            f"max_length={args.max_length} attention={args.attention}"
        )
        load_before = os.getloadavg()[0]
        client_cpu = time.process_time()
        results = run(model, images, args, names, tmp)
        client_cpu = time.process_time() - client_cpu
        print(
            f"machine: {os.cpu_count()} CPUs shared by the clients, the servers and any other "
            f"jobs; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"the clients used {client_cpu:.1f} CPU-s"
        )

    print_table(results)
    summary = {
        "batching_speedup": (
            round(results["on"]["rps"] / results["off"]["rps"], 2)
            if {"on", "off"} <= results.keys() and results["off"]["rps"] > 0
            else None
        ),
        "errors": sum(r["errors"] for r in results.values()),
        **{
            name: {k: r[k] for k in ("rps", "p50_ms", "p95_ms", "p99_ms", "peak_rss_mb")}
            for name, r in results.items()
        },
    }
    print(json.dumps(summary))
    return summary


def describe(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    captioner = Captioner.load(model)
    h, w = captioner.model.grid_hw
    params = sum(p.numel() for p in captioner.model.parameters()) / 1e6
    encoder = config.get("encoder", {})
    return f"{encoder.get('name')} {encoder.get('input_size')} px, grid {h}x{w}, {params:.2f} M parameters"


def print_table(results: dict) -> None:
    rows = ("rps", "p50_ms", "p95_ms", "p99_ms", "peak_rss_mb", "requests", "errors")
    rows += ("mean_batch", "mean_words", "server_cpu_ms_per_request")
    names = list(results)
    print(f"{'':27}" + "".join(f"{'batching ' + n:>14}" for n in names))
    for row in rows:
        print(f"{row:27}" + "".join(f"{results[n][row]!s:>14}" for n in names))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
