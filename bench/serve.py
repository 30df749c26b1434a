"""The service under load: throughput and latency of `POST /caption` with micro-batching on and off,
and the service's overhead over the library on the same work.

Starts a `captioner serve` process per mode on 127.0.0.1 (free ports; loopback only): `on`
(CAPTIONER_MAX_BATCH_SIZE=16, the captioner in a process of its own: the service's defaults),
`off` (=1), `thread` (=16, CAPTIONER_MODEL_PROCESS=false: the captioner in the batcher's worker
thread of the server's own process), and drives each in turn with N concurrent clients
sending real JPEGs (shapes-world scenes, or the coco-mini photos) for T seconds in all, split into
alternating rounds so that other jobs on a shared machine weigh on all sides alike. The clients
are plain HTTP/1.1 on asyncio streams, each on its own keep-alive connection, with every request
built beforehand: they share the CPUs with the servers, so they are kept cheap (about 0.3 ms of
CPU per request, where httpx took 2 ms).

After each round's servers, the library (`Captioner.load` in this process) captions the same
uploaded bytes for as long, in batches of the sizes the first server named (batching on, by
default) ran in that round, read from its request log (each answer's line names the size of its
batch): decode and preprocess, `encode` + `caption_features` as the service's batch does, and
`to_dict` with the requests' attention format. Not counted for the library: the JSON text, HTTP,
multipart parsing, the batching wait and the hops between the event loop and the threads (what
the service adds). Both sides use `--threads` torch threads: the servers through OMP_NUM_THREADS
(the service sets no thread count of its own), the library through `torch.set_num_threads`.
`service_overhead = 1 - service_rps / library_rps`, each the median of its rounds.

The model is the demo captioner `models/shapes-captioner/` when present, else a stand-in of the
architecture the demo is trained with (small CNN at 128 px pooled to an 8x8 grid, LSTM 256 with
soft attention, learned cell positions), random weights and `<end>` suppressed, so that every
caption runs to `max_length` (20 words by default; a trained model's shapes captions are about 10,
so the stand-in's figures are pessimistic).

    python bench/serve.py [--clients 16] [--seconds 20] [--rounds 4] [--images shapes|coco]
                          [--threads N] [--modes on,off,thread]

Peak memory is the VmHWM (peak resident set) from /proc of each server process and the
processes it started, summed; server CPU counts them all too; `model_ms_per_image`
and `model_busy` come from the server's batch-duration histogram. Last line: {"batching_speedup",
"errors", "compared_mode", "batch_size", "library_batch_size", "threads", "library_rps",
"service_rps", "service_overhead", "on": {"rps", "p50_ms", "p95_ms", "p99_ms", "peak_rss_mb"},
"off": {...}, "thread": {...}} (the modes run).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import procs
import torch
from procs import cpu_seconds, proc_mib, stop_server

from captioner.caption.caption_net import CaptionNet
from captioner.caption.captioner import Captioner
from captioner.data.shapes import generate_split, render
from captioner.encoder import EncoderConfig
from captioner.image import load_image, preprocess
from captioner.paths import DEFAULT_CAPTION_MODEL
from captioner.vocab import Vocabulary

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini" / "images"
# CAPTIONER_MAX_BATCH_SIZE and CAPTIONER_MODEL_PROCESS of each server
MODES = {"on": (16, True), "off": (1, True), "thread": (16, False)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument(
        "--seconds",
        type=float,
        default=20.0,
        help="measured time per server mode, and for the library (max 120)",
    )
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured load before measuring")
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds: the servers in alternating order, then the library",
    )
    p.add_argument("--images", choices=("shapes", "coco"), default="shapes")
    p.add_argument("--model", type=Path, default=None, help="captioner folder (default: the demo)")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--attention", choices=("none", "grid", "png"), default="grid")
    p.add_argument(
        "--modes",
        default="on,off",
        help="which servers to run, the library compared with the first: on (batches of up to "
        "16, the captioner in its own process: the service's defaults), off (batches of 1), "
        "thread (batches of up to 16, the captioner in the server's own process)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads of each server (OMP_NUM_THREADS) and of the library "
        "(default: torch's default here, which the service would get too)",
    )
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
    model: Path, mode: str, clients: int, threads: int, log: Path
) -> tuple[subprocess.Popen, str]:
    """`captioner serve` with the caption model only, as `mode` says (MODES: at most so many
    images a batch; the captioner in a process of its own or in the server's), and `threads`
    torch threads (OMP_NUM_THREADS: the service sets none of its own)."""
    batch_size, model_process = MODES[mode]
    env = dict(os.environ)
    env.update(
        CAPTIONER_CAPTION_MODEL=str(model),
        CAPTIONER_VQA_MODEL="",
        CAPTIONER_MAX_BATCH_SIZE=str(batch_size),
        CAPTIONER_MODEL_PROCESS=str(model_process).lower(),
        CAPTIONER_MAX_QUEUE=str(max(64, 4 * clients)),
        CAPTIONER_API_KEY="",
        CAPTIONER_DEVICE="cpu",
        CAPTIONER_LOG_LEVEL="INFO",  # one line per request, with the size of its batch
        OMP_NUM_THREADS=str(threads),
    )
    return procs.start_server(log, env)


# -- the clients ------------------------------------------------------------------------------------


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    words: list[int] = field(default_factory=list)  # caption length of each success
    errors: int = 0  # non-200 answers and failed connections
    wall: float = 0.0


BOUNDARY = "bench-serve-7d3f1c"


def caption_requests(url: str, images: list[bytes], args) -> list[bytes]:
    """Each image's whole `POST /caption` request (HTTP/1.1, keep-alive, multipart), built once,
    so that the clients spend their CPU on sending and reading, not on encoding forms."""
    host = url.removeprefix("http://")
    query = f"beam_size={args.beam_size}&max_length={args.max_length}&attention={args.attention}"
    requests = []
    for data in images:
        body = (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        head = (
            f"POST /caption?{query} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        requests.append(head + body)
    return requests


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bool]:
    """Send one request, read its answer: (status, body, whether the server closes)."""
    writer.write(request)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    return status, await reader.readexactly(length), close


async def drive(url: str, images: list[bytes], args, seconds: float) -> Load:
    """`args.clients` clients, each on its own keep-alive connection, posting images back to
    back for `seconds`. A plain HTTP/1.1 client on asyncio streams with the requests built
    beforehand (about 0.3 ms of CPU per request, where httpx took 2 ms), because the clients
    share the CPUs with the server they measure."""
    load = Load()
    requests = caption_requests(url, images, args)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    start = time.perf_counter()
    deadline = start + seconds

    async def one_client(index: int) -> None:
        i, connection = index, None
        while time.perf_counter() < deadline:
            request = requests[i % len(requests)]
            i += args.clients
            t0 = time.perf_counter()
            try:
                if connection is None:
                    connection = await asyncio.open_connection(host, int(port))
                status, body, close = await asyncio.wait_for(exchange(*connection, request), 60)
                words = len(json.loads(body)["tokens"]) if status == 200 else -1
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.TimeoutError,
                ValueError,
                KeyError,
                IndexError,
            ):
                words, close = -1, True
            if words >= 0:
                load.latencies.append(time.perf_counter() - t0)
                load.words.append(words)
            else:
                load.errors += 1
            if close and connection is not None:
                connection[1].close()
                connection = None
        if connection is not None:
            connection[1].close()

    await asyncio.gather(*(one_client(i) for i in range(args.clients)))
    load.wall = time.perf_counter() - start
    return load


def batch_counts(url: str) -> tuple[float, float, float]:
    """(images, batches, seconds in batches) the captioner has run so far, from the server's
    Prometheus histograms."""
    text = httpx.get(url + "/metrics", timeout=10).text
    names = ("captioner_batch_size_sum", "captioner_batch_size_count")
    names += ("captioner_batch_duration_seconds_sum",)
    values = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in values and 'model="captioner"' in line:
            values[name] = float(line.rsplit(" ", 1)[1])
    return tuple(values.values())


def rate(done: float, seconds: float) -> float:
    return done / seconds if seconds > 0 else float("nan")


@dataclass
class Mode:
    name: str
    proc: subprocess.Popen
    url: str
    log: Path
    load: Load = field(default_factory=Load)
    images: float = 0.0  # images and batches the model ran while measured
    batches: float = 0.0
    model_seconds: float = 0.0  # in batches (the model's worker thread: encoder and search)
    server_cpu: float = 0.0  # seconds
    client_cpu: float = 0.0  # seconds of this process (the clients) while measured
    round_rps: list[float] = field(default_factory=list)
    log_read: int = 0  # bytes of the server's log read so far

    def measure(self, images: list[bytes], args, seconds: float) -> None:
        before, cpu = batch_counts(self.url), cpu_seconds(self.proc.pid)
        client_cpu = time.process_time()
        load = asyncio.run(drive(self.url, images, args, seconds))
        self.client_cpu += time.process_time() - client_cpu
        after = batch_counts(self.url)
        self.server_cpu += cpu_seconds(self.proc.pid) - cpu
        self.images += after[0] - before[0]
        self.batches += after[1] - before[1]
        self.model_seconds += after[2] - before[2]
        self.load.latencies += load.latencies
        self.load.words += load.words
        self.load.errors += load.errors
        self.load.wall += load.wall
        self.round_rps.append(rate(len(load.latencies), load.wall))

    def batch_sizes(self) -> dict[int, float]:
        """How many batches of each size the server ran for `/caption` since the last call.
        Read from its request log: each answer's line names the size of the batch it ran in, so
        a batch of k images is k lines with `"batch_size": k`."""
        with self.log.open("rb") as f:
            f.seek(self.log_read)
            text = f.read()
        complete = text[: text.rfind(b"\n") + 1]  # a line still being written waits
        self.log_read += len(complete)
        answers: Counter[int] = Counter()
        for line in complete.splitlines():
            if b'"batch_size"' not in line:
                continue
            record = json.loads(line)
            if record.get("route") == "/caption" and record.get("status") == 200:
                answers[int(record["batch_size"])] += 1
        if not answers:
            raise RuntimeError(f"no new /caption answer in the server's log {self.log}")
        return {k: n / k for k, n in sorted(answers.items())}

    def result(self) -> dict:
        load = self.load
        ms = np.array(load.latencies) * 1000.0 if load.latencies else np.array([float("nan")])
        done = len(load.latencies)
        return {
            "rps": round(rate(done, load.wall), 2),
            "median_round_rps": round(float(np.median(self.round_rps)), 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "peak_rss_mb": round(proc_mib(self.proc.pid, "VmHWM"), 1),
            "requests": done,
            "errors": load.errors,
            "mean_batch": round(self.images / self.batches, 2) if self.batches else float("nan"),
            "mean_words": round(float(np.mean(load.words)), 1) if load.words else float("nan"),
            "server_cpu_ms_per_request": round(1000 * self.server_cpu / done, 1) if done else None,
            "model_ms_per_image": round(1000 * self.model_seconds / self.images, 2)
            if self.images
            else None,
            "model_busy": round(self.model_seconds / load.wall, 2) if load.wall else None,
            "client_cpu_ms_per_request": round(1000 * self.client_cpu / done, 1) if done else None,
        }


# -- the library on the same batches ----------------------------------------------------------------


@dataclass
class Library:
    """The captioner in this process, on the images the clients upload, in batches of the sizes
    the server ran, doing what the service does per batch: decode and preprocess each upload
    (`load_image`, `preprocess`), one encoder pass and one batched search (`encode`,
    `caption_features`, as `CaptionService.run_batch`), and each result's `to_dict` with the
    requests' attention format. Not counted: the JSON text of those dicts, HTTP, multipart
    parsing, the batching wait and the hops between the event loop and the threads, which are
    what the service adds."""

    captioner: Captioner
    images: int = 0
    batches: int = 0
    wall: float = 0.0
    model_seconds: float = 0.0  # in encode + caption_features
    cpu: float = 0.0  # seconds of this process
    words: list[int] = field(default_factory=list)
    round_rps: list[float] = field(default_factory=list)
    _next_image: int = 0

    def measure(self, uploads: list[bytes], served: dict[int, float], args, seconds: float) -> None:
        """Batches for `seconds`, each of the size furthest behind its share of the server's
        batches (`served`: size -> batches), so that the sizes follow the server's mix."""
        captioner = self.captioner
        images = batches = 0
        ran: Counter[int] = Counter()
        total = sum(served.values())
        cpu, start = time.process_time(), time.perf_counter()
        while time.perf_counter() - start < seconds:
            size = max(served, key=lambda k: served[k] / total - ran[k] / (batches + 1))
            ran[size] += 1
            batch = [uploads[(self._next_image + i) % len(uploads)] for i in range(size)]
            self._next_image += size
            decoded = [load_image(data) for data in batch]
            pixels = torch.stack([preprocess(image, captioner.input_size) for image in decoded])
            started = time.perf_counter()
            with torch.inference_mode():
                features = captioner.encode(pixels)  # (B, L, D)
                results = captioner.caption_features(
                    features, beam_size=args.beam_size, max_length=args.max_length
                )
            self.model_seconds += time.perf_counter() - started
            bodies = [r.to_dict(args.attention, im) for r, im in zip(results, decoded)]
            self.words += [len(body["tokens"]) for body in bodies]
            images += size
            batches += 1
        wall = time.perf_counter() - start
        self.cpu += time.process_time() - cpu
        self.wall += wall
        self.images += images
        self.batches += batches
        self.round_rps.append(rate(images, wall))

    def result(self) -> dict:
        n = self.images
        return {
            "rps": round(rate(n, self.wall), 2),
            "median_round_rps": round(float(np.median(self.round_rps)), 2),
            "images": n,
            "mean_batch": round(n / self.batches, 2) if self.batches else float("nan"),
            "mean_words": round(float(np.mean(self.words)), 1) if self.words else float("nan"),
            "cpu_ms_per_image": round(1000 * self.cpu / n, 2) if n else None,
            "model_ms_per_image": round(1000 * self.model_seconds / n, 2) if n else None,
        }


def run(
    model: Path, images: list[bytes], args, names: list[str], tmp: Path
) -> tuple[dict[str, dict], dict]:
    """Both servers up at once, measured in alternating rounds; after each round's servers, the
    library on the batch sizes the first server named ran in that round. A change in the
    machine's other load during the run falls on all sides alike."""
    captioner = Captioner.load(model)
    modes: list[Mode] = []
    try:
        for name in names:
            log = tmp / f"server-{name}.log"
            proc, url = start_server(model, name, args.clients, args.threads, log)
            modes.append(Mode(name, proc, url, log))
        for mode in modes:
            asyncio.run(drive(mode.url, images, args, args.warmup))
        compared = modes[0]
        Library(captioner).measure(images, compared.batch_sizes(), args, args.warmup / 2)
        library = Library(captioner)
        seconds = args.seconds / args.rounds
        for round_ in range(args.rounds):
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                mode.measure(images, args, seconds)
            library.measure(images, compared.batch_sizes(), args, seconds)
        return {mode.name: mode.result() for mode in modes}, library.result()
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
    if not 1 <= args.threads <= 256:
        raise ValueError(f"--threads must be in 1..256, got {args.threads}")
    names = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not names or any(m not in MODES for m in names) or len(set(names)) < len(names):
        raise ValueError(
            f"--modes must name some of {', '.join(MODES)} once each, got {args.modes!r}"
        )
    torch.set_num_threads(args.threads)  # the library's side; the servers get OMP_NUM_THREADS

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
            f"load: {args.clients} clients, {args.seconds:g} s per mode and for the library in "
            f"{args.rounds} alternating rounds after {args.warmup:g} s warm-up; "
            f"beam_size={args.beam_size} max_length={args.max_length} attention={args.attention}; "
            f"{args.threads} torch threads in each server and for the library"
        )
        load_before = os.getloadavg()[0]
        if args.threads > 1 and load_before > 0.5 * (os.cpu_count() or 1):
            print(
                f"note: load average {load_before:.2f} before the run: with other jobs on the "
                f"CPUs, {args.threads} torch threads a process can stall in OpenMP's barriers "
                "(the library more than the servers); --threads 1 compares more steadily"
            )
        results, lib = run(model, images, args, names, tmp)
        print(
            f"machine: {os.cpu_count()} CPUs shared by the clients, the servers, the library and "
            f"any other jobs; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
        )

    print_table(results, lib, args.threads)
    compared = results[names[0]]
    service_rps, library_rps = compared["median_round_rps"], lib["median_round_rps"]
    summary = {
        "batching_speedup": (
            round(results["on"]["rps"] / results["off"]["rps"], 2)
            if {"on", "off"} <= results.keys() and results["off"]["rps"] > 0
            else None
        ),
        "errors": sum(r["errors"] for r in results.values()),
        "compared_mode": names[0],
        "batch_size": compared["mean_batch"],
        "library_batch_size": lib["mean_batch"],
        "threads": args.threads,
        "library_rps": library_rps,
        "service_rps": service_rps,
        "service_overhead": round(1 - service_rps / library_rps, 3) if library_rps > 0 else None,
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


def print_table(results: dict, library: dict, threads: int) -> None:
    rows = ("rps", "median_round_rps", "p50_ms", "p95_ms", "p99_ms", "peak_rss_mb", "requests")
    rows += ("errors", "mean_batch", "mean_words", "server_cpu_ms_per_request")
    rows += ("model_ms_per_image", "model_busy", "client_cpu_ms_per_request")
    names = list(results)
    print(f"{'':27}" + "".join(f"{n:>14}" for n in names))
    for row in rows:
        print(f"{row:27}" + "".join(f"{results[n][row]!s:>14}" for n in names))
    print(
        f"library ({threads} torch threads, this process, the same images in batches of the same "
        f"sizes): {library['median_round_rps']} images/s median of rounds ({library['rps']} in "
        f"all), {library['images']} images, mean batch {library['mean_batch']}, mean words "
        f"{library['mean_words']}, CPU {library['cpu_ms_per_image']} ms per image, of which "
        f"{library['model_ms_per_image']} ms in encode + caption_features"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
