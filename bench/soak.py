"""Soak: the service under steady concurrent load for a bounded time, then above its capacity.

Starts one `captioner serve` process on 127.0.0.1 (a free port; loopback only) with the demo models
(`models/shapes-captioner`, `models/shapes-vqa`) and a queue as long as the steady load needs
(CAPTIONER_MAX_QUEUE = --concurrency images waiting per model), and drives it with closed-loop
asyncio clients (httpx: each sends its next request when the last is answered) that alternate
`POST /caption` and `POST /vqa` over rendered shapes-world scenes (JPEG), asking questions the
scenes answer, with attention cycling grid, grid, none, png.

    python bench/soak.py [--steady-seconds 90] [--overload-seconds 30] [--concurrency 8]

Phases, one server throughout (about 2.5 minutes with the defaults):
  warm-up   each image once to each endpoint (the VQA feature cache then holds them all), then
            --warmup-seconds of steady load; idle RSS "start", which later readings are compared to
  steady    --concurrency clients for --steady-seconds, in two halves, idle RSS "middle" between
            them and "end_of_steady" after them
  overload  the steady clients plus --overload-concurrency more (5x by default), sending back to
            back without honouring Retry-After, for --overload-seconds: more requests than the two
            models' queues and running batches hold (at most 2 x CAPTIONER_MAX_QUEUE each); and
            one more client in its own process, one /caption at a time (what a client outside the
            crowd sees: the crowd's latencies include its own event loop's turns)
  after     GET /ready, one normal /caption and one /vqa (`healthy_after`); idle RSS "end"

Memory is the server process's VmRSS from /proc/<pid>/status, read with no request in flight, so
the readings compare like with like; its peak (VmHWM) is printed too. memory_growth is
(end - start) / start, so it includes whatever the overload phase left behind.

Latencies are as the clients saw them. The clients share the machine's CPUs with the server, so
each phase also reports how late the clients' own event loop woke up (`client_loop_lag_ms`) and
the latencies the server logged for the same requests (from the ASGI call to the last byte).

Unexpected (`unexpected_5xx`): any 5xx other than a 503 with a positive Retry-After and a 504 (the
per-request timeout, CAPTIONER_REQUEST_TIMEOUT_S, 10 s here); a 200 without its JSON fields; and a
request that got no answer at all (connection error, or none within the timeout plus 20 s), since
a dropped request is no better than a 500. 4xx answers to these valid requests are printed apart.

Last line: {"unexpected_5xx", "memory_growth", "overload_503_p99_ms", "healthy_after"};
overload_503_p99_ms (client-side) is null when the overload phase drew no 503 at all.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
from procs import cpu_seconds, free_port, proc_mib, stop_server

from captioner.data.shapes import generate_split, render
from captioner.paths import DEFAULT_CAPTION_MODEL, DEFAULT_VQA_MODEL

ENDPOINTS = ("/caption", "/vqa")
ATTENTION = ("grid", "grid", "none", "png")
BODY_KEYS = {"/caption": "caption", "/vqa": "answer"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, default=8, help="steady clients")
    p.add_argument("--steady-seconds", type=float, default=90.0, help="steady load (max 3600)")
    p.add_argument("--overload-seconds", type=float, default=30.0, help="overload (max 3600)")
    p.add_argument(
        "--overload-concurrency",
        type=int,
        default=None,
        help="extra clients while overloading (default: 5 x --concurrency)",
    )
    p.add_argument("--warmup-seconds", type=float, default=10.0, help="unmeasured load first")
    p.add_argument(
        "--queue",
        type=int,
        default=None,
        help="CAPTIONER_MAX_QUEUE, images waiting per model (default: --concurrency)",
    )
    p.add_argument(
        "--request-timeout", type=float, default=10.0, help="CAPTIONER_REQUEST_TIMEOUT_S"
    )
    p.add_argument("--images", type=int, default=48, help="distinct shapes scenes sent")
    p.add_argument("--caption-model", type=Path, default=DEFAULT_CAPTION_MODEL)
    p.add_argument("--vqa-model", type=Path, default=DEFAULT_VQA_MODEL)
    p.add_argument("--server-log", type=Path, default=None, help="keep the server's log here")
    return p


# -- the requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    jpeg: bytes
    questions: tuple[str, ...]


def samples(n: int) -> list[Sample]:
    out = []
    for scene in generate_split(n, seed=606):
        buf = io.BytesIO()
        render(scene).save(buf, "JPEG", quality=90)
        out.append(Sample(buf.getvalue(), tuple(q.question for q in scene.questions)))
    return out


def request_args(samples: list[Sample], client: int, n: int) -> tuple[str, dict, dict, dict | None]:
    """The `n`-th request of client number `client`: (path, query, files, form data). Each client
    alternates /caption and /vqa and walks the images from its own starting point."""
    sample = samples[(7 * client + n // 2) % len(samples)]
    path = ENDPOINTS[(client + n) % 2]
    params = {"attention": ATTENTION[(client + n // 2) % len(ATTENTION)]}
    files = {"image": ("scene.jpg", sample.jpeg, "image/jpeg")}
    if path == "/caption":
        return path, params, files, None
    question = sample.questions[(client + n // (2 * len(samples))) % len(sample.questions)]
    return path, params, files, {"question": question}


# -- the server -------------------------------------------------------------------------------------


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        CAPTIONER_MAX_QUEUE=str(args.queue),
        CAPTIONER_MAX_BATCH_IMAGES=str(min(16, args.queue)),  # must fit in the queue
        CAPTIONER_REQUEST_TIMEOUT_S=str(args.request_timeout),
        CAPTIONER_API_KEY="",
        CAPTIONER_DEVICE="cpu",
    )
    command = [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    command += ["--caption-model", str(args.caption_model), "--vqa-model", str(args.vqa_model)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            ready = httpx.get(url + "/ready", timeout=2)
        except httpx.HTTPError:
            ready = None
        if ready is not None and ready.status_code == 200:
            return proc, url
        if ready is not None and "failed" in ready.text:  # a model did not load: no use waiting
            stop_server(proc)
            raise RuntimeError(f"the server is up but not ready: {ready.text}")
        time.sleep(0.25)
    stop_server(proc)
    raise RuntimeError(f"the server was not ready within 120 s:\n{log.read_text()[-2000:]}")


def read_log(log: Path) -> tuple[list[str], list[dict]]:
    """The server log's problems (records at ERROR or above, and traceback lines outside the JSON
    records) and its per-request records (`status`, `duration_ms`, ... and `at`, a Unix time)."""
    problems, requests = [], []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            # uvicorn's own lines ("WARNING:  Invalid HTTP request received.") are plain text
            if "Traceback" in line or "Error" in line or line.startswith(("WARNING", "ERROR")):
                problems.append(line.strip())
            continue
        if not isinstance(record, dict):
            continue
        if record.get("level") in ("ERROR", "CRITICAL"):
            problems.append(f"{record.get('message')}: {str(record.get('exception', ''))[-300:]}")
        if record.get("message") == "request" and record.get("path") in ENDPOINTS:
            record["at"] = datetime.fromisoformat(record["time"]).timestamp()
            requests.append(record)
    return problems, requests


def server_side(requests: list[dict], phase: Phase) -> dict:
    """Latency percentiles by status as the server logged them (from the ASGI call to the last
    byte sent) for the requests that finished during `phase`: the time the service itself took,
    without the clients' own queueing on a CPU they share with it."""
    by_status = defaultdict(list)
    for r in requests:
        if phase.began <= r["at"] <= phase.ended:
            by_status[str(r["status"])].append(r["duration_ms"] / 1000.0)
    return {status: percentiles(seconds) for status, seconds in sorted(by_status.items())}


# -- the clients ------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    statuses: Counter = field(default_factory=Counter)  # (path, status or error name) -> count
    latencies: dict = field(default_factory=lambda: defaultdict(list))  # kind -> seconds
    unexpected: Counter = field(default_factory=Counter)  # reason -> count
    details: Counter = field(default_factory=Counter)  # "status: detail" of each error answer
    wall: float = 0.0  # seconds of load
    began: float = float("inf")  # Unix times of its first and last second of load
    ended: float = 0.0

    def record(self, path: str, outcome: str, kind: str, seconds: float) -> None:
        self.statuses[(path, outcome)] += 1
        self.latencies[kind].append(seconds)

    def answer(self, path: str, response: httpx.Response, seconds: float) -> None:
        kind, problem = classify(path, response)
        self.record(path, str(response.status_code), kind, seconds)
        if problem:
            self.unexpected[problem] += 1
        if response.status_code != 200:
            try:
                detail = str(response.json().get("detail"))
            except (ValueError, AttributeError):
                detail = response.text
            # numbers vary ("3 of 4 waiting"): keep the words, so that alike errors add up
            self.details[f"{response.status_code}: {re.sub(r'[0-9.]+', 'N', detail)[:120]}"] += 1

    def ok(self) -> int:
        return sum(n for (_, outcome), n in self.statuses.items() if outcome == "200")

    def summary(self) -> dict:
        out = {
            "seconds": round(self.wall, 1),
            "ok_per_s": round(self.ok() / self.wall, 2) if self.wall else None,
            "statuses": {f"{p} {o}": n for (p, o), n in sorted(self.statuses.items())},
            "unexpected": dict(self.unexpected),
            "error_details": dict(self.details),
        }
        for kind in sorted(self.latencies):
            out[f"{kind}_ms"] = percentiles(self.latencies[kind])
        return out


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    ms = np.array(seconds) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "n": len(ms),
        "p50": round(float(p50), 1),
        "p90": round(float(p90), 1),
        "p99": round(float(p99), 1),
        "max": round(float(ms.max()), 1),
    }


def causes(exc: BaseException) -> str:
    """The exception and what it came from ("ReadError('') <- ConnectionResetError(104, ...)"):
    a reset connection and one the server closed cleanly read alike at the top."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen and len(chain) < 6:
        seen.add(id(exc))
        chain.append(repr(exc)[:160])
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(chain)


def classify(path: str, response: httpx.Response) -> tuple[str, str | None]:
    """(latency kind, reason it is unexpected or None) of one answer."""
    status = response.status_code
    if status == 200:
        try:
            body = response.json()
        except ValueError:
            return "ok", "200 without a JSON body"
        if not isinstance(body, dict) or not isinstance(body.get(BODY_KEYS[path]), str):
            return "ok", f"200 without {BODY_KEYS[path]!r}"
        return "ok", None
    if status == 503:
        retry_after = response.headers.get("Retry-After", "")
        if not (retry_after.isdigit() and int(retry_after) > 0):
            return "503", "503 without a positive Retry-After"
        return "503", None
    if status == 504:
        return "504", None
    if status >= 500:
        return "other_5xx", f"{status}"
    return "4xx", None


async def drive(
    url: str,
    samples: list[Sample],
    phase: Phase,
    clients: int,
    seconds: float,
    timeout: float,
    offset: int = 0,
    extra: tuple[int, float] | None = None,
) -> None:
    """`clients` closed-loop clients (each waits for its answer, then posts the next request) for
    `seconds`; `extra` = (clients, seconds) more that run alongside them for the last seconds."""
    total = clients + (extra[0] if extra else 0)
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        end = start + seconds

        async def one_client(index: int, begin: float) -> None:
            await asyncio.sleep(max(0.0, begin - time.perf_counter()))
            n = 0
            while time.perf_counter() < end:
                path, params, files, data = request_args(samples, offset + index, n)
                n += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post(path, params=params, files=files, data=data)
                except httpx.HTTPError as exc:
                    took = time.perf_counter() - t0
                    phase.record(path, type(exc).__name__, "no_answer", took)
                    phase.unexpected[f"no answer ({type(exc).__name__})"] += 1
                    phase.details[f"no answer after {took * 1000:.0f} ms: {causes(exc)}"] += 1
                    continue
                phase.answer(path, response, time.perf_counter() - t0)

        async def watch_loop(step: float = 0.05) -> None:
            """How late this client process's event loop wakes up: a check that the figures
            measure the server, not a client starved of CPU."""
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await asyncio.sleep(step)
                phase.latencies["client_loop_lag"].append(time.perf_counter() - t0 - step)

        tasks = [watch_loop(), *(one_client(c, start) for c in range(clients))]
        if extra:
            tasks += [one_client(clients + c, end - extra[1]) for c in range(extra[0])]
        phase.began = min(phase.began, time.time())
        await asyncio.gather(*tasks)
        phase.wall += time.perf_counter() - start
        phase.ended = time.time()


async def warm_up(url: str, samples: list[Sample], clients: int, timeout: float) -> Phase:
    """Every image once to each endpoint (so the VQA feature cache holds them all), `clients` at
    a time; the caller then adds `--warmup-seconds` of steady load."""
    phase = Phase("warm-up")
    queue = [(0, n) for n in range(2 * len(samples))]  # client 0's first requests: all of them
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:

        async def worker() -> None:
            while queue:
                path, params, files, data = request_args(samples, *queue.pop())
                t0 = time.perf_counter()
                response = await client.post(path, params=params, files=files, data=data)
                phase.answer(path, response, time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return phase


def polite_client(url: str, jpeg: bytes, until: float, out) -> None:
    """In its own process: one POST /caption at a time, 50 ms apart, until Unix time `until`;
    sends [(status or error name, seconds)] back through the pipe `out`. What a client that is not
    part of the crowd sees of the overload, without the crowd's event loop in its latencies."""
    answers = []
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.time() < until:
            t0 = time.perf_counter()
            try:
                files = {"image": ("scene.jpg", jpeg, "image/jpeg")}
                outcome = str(client.post("/caption", files=files).status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            answers.append((outcome, time.perf_counter() - t0))
            time.sleep(0.05)
    out.send(answers)
    out.close()


def start_polite_client(url: str, jpeg: bytes, seconds: float):
    """`polite_client` in a spawned process; returns a function that waits for its answers as
    {status: percentiles}."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    until = time.time() + seconds  # from now, however long the process takes to start
    process = context.Process(target=polite_client, args=(url, jpeg, until, send), daemon=True)
    process.start()
    send.close()

    def result() -> dict:
        answers = receive.recv() if receive.poll(seconds + 120) else []
        process.join(timeout=10)
        by_status = defaultdict(list)
        for outcome, took in answers:
            by_status[outcome].append(took)
        return {status: percentiles(took) for status, took in sorted(by_status.items())}

    return result


def check_health(url: str, sample: Sample) -> dict:
    """After the overload: /ready, then one normal /caption and /vqa (defaults, no load)."""
    out: dict = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        started = time.perf_counter()
        ready = client.get("/ready")
        out["ready"] = ready.status_code
        files = {"image": ("scene.jpg", sample.jpeg, "image/jpeg")}
        caption = client.post("/caption", files=files)
        out["caption"] = caption.status_code
        out["caption_text"] = caption.json().get("caption") if caption.status_code == 200 else None
        vqa = client.post("/vqa", files=files, data={"question": sample.questions[0]})
        out["vqa"] = vqa.status_code
        out["seconds"] = round(time.perf_counter() - started, 2)
    out["healthy"] = (
        out["ready"] == 200 and out["caption"] == 200 and bool(out["caption_text"])
    ) and out["vqa"] == 200
    return out


# -- main -------------------------------------------------------------------------------------------


def idle_rss_mb(pid: int, settle: float = 1.0) -> float:
    """VmRSS with no request in flight, after `settle` seconds for the last answers to finish."""
    time.sleep(settle)
    return round(proc_mib(pid, "VmRSS"), 1)


def check_args(args: argparse.Namespace) -> None:
    if args.queue is None:
        args.queue = args.concurrency
    if args.overload_concurrency is None:
        args.overload_concurrency = 5 * args.concurrency
    for name in ("concurrency", "overload_concurrency", "queue", "images"):
        if not 1 <= getattr(args, name) <= 1024:
            raise ValueError(
                f"--{name.replace('_', '-')} must be in 1..1024, got {getattr(args, name)}"
            )
    for name in ("steady_seconds", "overload_seconds", "warmup_seconds", "request_timeout"):
        value = getattr(args, name)
        if not 0 <= value <= 3600 or (name != "warmup_seconds" and value == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be in (0, 3600], got {value}")
    for name in ("caption_model", "vqa_model"):
        if not (getattr(args, name) / "config.json").exists():
            raise ValueError(
                f"--{name.replace('_', '-')}: no model folder at {getattr(args, name)}"
            )


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    images = samples(args.images)
    timeout = args.request_timeout + 20.0  # the client's: past the server's own timeout
    print(f"models: {args.caption_model}, {args.vqa_model}")
    print(
        f"load: {len(images)} shapes JPEGs, /caption and /vqa alternating, attention "
        f"{'/'.join(ATTENTION)}; {args.concurrency} clients for {args.steady_seconds:g} s steady "
        f"after {args.warmup_seconds:g} s warm-up, then {args.overload_concurrency} more for "
        f"{args.overload_seconds:g} s; CAPTIONER_MAX_QUEUE={args.queue}, "
        f"CAPTIONER_REQUEST_TIMEOUT_S={args.request_timeout:g}",
        flush=True,
    )
    if args.queue < args.concurrency:
        print(f"note: --queue {args.queue} < --concurrency {args.concurrency}: steady load may 503")

    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        log = args.server_log or Path(tmp) / "server.log"
        load_before = os.getloadavg()[0]
        client_cpu = time.process_time()
        proc, url = start_server(args, log)
        try:
            pid = proc.pid
            rss: dict[str, float] = {"loaded": idle_rss_mb(pid, 0.0)}
            phases = [asyncio.run(warm_up(url, images, args.concurrency, timeout))]
            phases.append(Phase("warm-up load"))
            if args.warmup_seconds:
                asyncio.run(
                    drive(url, images, phases[-1], args.concurrency, args.warmup_seconds, timeout)
                )
            rss["start"] = idle_rss_mb(pid)
            print(
                f"warm-up done; RSS {rss['start']} MB (after loading: {rss['loaded']} MB)",
                flush=True,
            )

            steady = Phase("steady")
            half = args.steady_seconds / 2
            server_cpu = cpu_seconds(pid)
            asyncio.run(drive(url, images, steady, args.concurrency, half, timeout))
            rss["middle"] = idle_rss_mb(pid)
            asyncio.run(drive(url, images, steady, args.concurrency, half, timeout, offset=7))
            rss["end_of_steady"] = idle_rss_mb(pid)
            server_cpu = cpu_seconds(pid) - server_cpu
            print(
                f"steady done; RSS {rss['middle']} MB in the middle, {rss['end_of_steady']} MB at its end",
                flush=True,
            )

            overload = Phase("overload")
            polite_answers = start_polite_client(url, images[0].jpeg, args.overload_seconds)
            asyncio.run(
                drive(
                    url,
                    images,
                    overload,
                    args.concurrency,
                    args.overload_seconds,
                    timeout,
                    offset=13,
                    extra=(args.overload_concurrency, args.overload_seconds),
                )
            )
            polite = polite_answers()
            health = check_health(url, images[0])
            rss["end"] = idle_rss_mb(pid)
            rss["peak"] = round(proc_mib(pid, "VmHWM"), 1)
            alive = proc.poll() is None
        finally:
            stop_server(proc)
        problems, requests = read_log(log)
        client_cpu = time.process_time() - client_cpu

    phases += [steady, overload]
    print(
        f"machine: {os.cpu_count()} CPUs shared by the clients, the server and any other jobs; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; clients used "
        f"{client_cpu:.1f} CPU-s; the server {server_cpu / max(steady.ok(), 1) * 1000:.0f} CPU-ms "
        f"per answered request in the steady phase"
    )
    for phase in phases:
        print(f"{phase.name}: {json.dumps(phase.summary())}")
    for phase in (steady, overload):
        print(f"{phase.name}, server-side ms by status: {json.dumps(server_side(requests, phase))}")
    print(f"overload, one more client sending one /caption at a time: {json.dumps(polite)}")
    print(f"health after overload: {json.dumps(health)}; server alive: {alive}")
    print(f"RSS MB: {json.dumps(rss)}")
    if problems:
        print(f"server log: {len(problems)} error records, first: {problems[:3]}")
    bad_4xx = sum(n for p in phases for (_, o), n in p.statuses.items() if o.startswith("4"))
    if bad_4xx:
        print(f"warning: {bad_4xx} 4xx answers to valid requests")

    unexpected = sum(sum(p.unexpected.values()) for p in phases)
    overload_503 = overload.latencies.get("503", [])
    result = {
        "unexpected_5xx": unexpected,
        "memory_growth": round((rss["end"] - rss["start"]) / rss["start"], 4),
        "overload_503_p99_ms": (
            round(float(np.percentile(np.array(overload_503) * 1000.0, 99)), 1)
            if overload_503
            else None
        ),
        "healthy_after": bool(health["healthy"] and alive),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
