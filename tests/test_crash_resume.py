"""Crash and resume: kill -9 training, folder captioning and the service at seeded random moments,
rerun them, and check what is on disk.

Each subprocess gets its own session and is killed with `os.killpg(..., SIGKILL)`, so no worker
outlives it. The kill points come from `random.Random(SEED)`: which step, which line count, how
many requests have been answered, plus a short random delay so a kill can land anywhere in a
step, a save or a write. The waits poll markers on disk (or HTTP), never fixed sleeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from captioner.caption.captioner import Captioner
from captioner.checkpoint import load_model_dir, recover_model_dir
from captioner.data.shapes import generate_split, render
from captioner.paths import REPO_ROOT
from captioner.vocab import Vocabulary
from tests.api_fixtures import png, save_tiny_captioner
from tests.conftest import tiny_model
from training import caption_folder, train_captioner
from training.make_shapes import write_split

SEED = 20240606
KILLS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


# -- processes -----------------------------------------------------------------------------------


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """`cmd` in a session of its own, stdout and stderr to `log` (never a pipe that could fill)."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group (a no-op once it is gone) and reap the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@contextlib.contextmanager
def _running(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    proc = _start(cmd, log)
    try:
        yield proc
    finally:
        _kill(proc)


def _wait_until(
    cond: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, every: float = 0.002
) -> None:
    deadline = time.monotonic() + 120
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{_tail(log)}")
        time.sleep(every)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """For in-process runs that must match the subprocesses (OMP_NUM_THREADS=1) number for number."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


# -- save_model_dir killed at its three dangerous moments -----------------------------------------

KILLED_SAVE = r"""
import json, os, signal, sys
from pathlib import Path
import torch
from captioner import checkpoint

def die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)

def patch(mode, folder):
    if mode == "mid_write":  # config.json written, the weights not yet
        checkpoint.save_tensors = die
    elif mode == "between_renames":  # no atomic exchange: NAME moved aside, the new one not in
        checkpoint._exchange = lambda a, b: False
        real_replace = os.replace
        def replace(src, dst):
            if Path(src).name.startswith(f".{folder.name}.tmp-"):
                die()
            real_replace(src, dst)
        checkpoint.os.replace = replace
    elif mode == "after_exchange":  # the new folder is in; the old one not yet deleted
        checkpoint.shutil.rmtree = die

status = {}
for mode in sys.argv[2:]:  # one forked child per mode, killed inside its second save
    folder = Path(sys.argv[1]) / mode / "m"
    checkpoint.save_model_dir(folder, {"kind": "t", "name": "v1"}, {"w": torch.zeros(3)})
    pid = os.fork()
    if pid == 0:
        patch(mode, folder)
        checkpoint.save_model_dir(folder, {"kind": "t", "name": "v2"}, {"w": torch.ones(3)})
        os._exit(0)
    status[mode] = os.waitpid(pid, 0)[1]
print(json.dumps(status))
"""
SURVIVORS = {"mid_write": "v1", "between_renames": "v1", "after_exchange": "v2"}


def test_a_save_killed_midway_leaves_a_complete_folder_after_recovery(tmp_path):
    """save_model_dir SIGKILLed at its three dangerous moments; recover_model_dir (which the next
    save and --resume run) then leaves one complete folder: the old one or the new one."""
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(tmp_path), *SURVIVORS],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads(proc.stdout)
    for mode, survivor in SURVIVORS.items():
        assert os.WIFSIGNALED(status[mode]) and os.WTERMSIG(status[mode]) == signal.SIGKILL, mode
        folder = tmp_path / mode / "m"
        leftovers = [p.name for p in folder.parent.iterdir() if p.name != "m"]
        assert leftovers, f"{mode}: the kill should have left a temporary sibling"
        assert folder.exists() == (mode != "between_renames"), mode

        recover_model_dir(folder)
        assert [p.name for p in folder.parent.iterdir()] == ["m"], mode
        config, weights, _ = load_model_dir(folder, "t")
        assert config["name"] == survivor, mode
        assert torch.equal(weights["w"], torch.full((3,), float(survivor == "v2"))), mode


# -- training ------------------------------------------------------------------------------------

TINY = ["--input-size", "32", "--encoder-width", "4", "--embed-dim", "16", "--hidden-dim", "24"]
TINY += ["--attention-dim", "12", "--batch-size", "16", "--warmup-steps", "2", "--no-progress"]
EPOCHS = 4
RESUMED = re.compile(r"resuming from (\S+) at step (\d+)")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_split(generate_split(24, seed=5, size=32), root / "train")
    write_split(generate_split(6, seed=6, size=32, start_id=1000), root / "val")
    return root


def _train_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "training.train_captioner", *argv]


def _saved_step(run: Path) -> int | None:
    try:
        return json.loads((run / "last" / "trainer.json").read_text())["step"]
    except FileNotFoundError:
        return None


def _check_model_folders(run: Path) -> int:
    """Every model folder on disk is complete and loads; returns the step last/ holds (0: none)."""
    if (run / "best").exists():
        Captioner.load(run / "best")
    if not (run / "last").exists():
        return 0
    Captioner.load(run / "last")
    _, _, side = load_model_dir(
        run / "last", "captioner", ("trainer.json", "optimizer.safetensors")
    )
    return side["trainer.json"]["step"]


def _plant_half_written_last(run: Path, step: int) -> Path:
    """What a kill in the middle of a save leaves: a temporary sibling of last/ that claims a later
    step but whose weights are cut short. --resume must ignore it (and clear it away)."""
    fake = run / ".last.tmp-planted"
    shutil.copytree(run / "last", fake)
    trainer = json.loads((fake / "trainer.json").read_text())
    (fake / "trainer.json").write_text(json.dumps({**trainer, "step": step}))
    weights = (fake / "model.safetensors").read_bytes()
    (fake / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return fake


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _train_here(argv: list[str]) -> dict:
    """The script's main() in this process, on one thread like the subprocesses."""
    with _one_thread():
        return train_captioner.main(train_captioner.get_args_parser().parse_args(argv), argv)


def test_training_killed_at_random_steps_resumes_from_the_last_complete_folder(
    shapes, tmp_path, capsys
):
    rng = random.Random(SEED)
    base = ["--data", str(shapes), "--epochs", str(EPOCHS), *TINY, "--device", "cpu"]
    straight = tmp_path / "straight"
    total = _train_here([*base, "--out", str(straight)])["step"]
    assert total % EPOCHS == 0 and total >= 4 * EPOCHS
    per_epoch = total // EPOCHS

    run = tmp_path / "run"
    first = _train_cmd(*base, "--out", str(run), "--save-every", "1")
    resume = _train_cmd("--out", str(run), "--resume", "--no-progress")
    # Kill 1 as soon as the run has started (most likely before its first save); kills 2 and 3
    # once last/ holds a random later step, each after a random fraction of a step.
    targets = [0, *sorted(rng.sample(range(1, total * 3 // 4), KILLS - 1))]
    on_disk, planted = 0, None
    for k, target in enumerate(targets):
        log = tmp_path / f"kill{k}.log"
        with _running(first if k == 0 else resume, log) as proc:
            if target == 0:
                _wait_until((run / "args.json").exists, proc, log, "the run folder")
            else:  # and at least one step past where it resumed
                target = max(target, on_disk + 1)
                _wait_until(
                    lambda t=target: (_saved_step(run) or 0) >= t, proc, log, f"step {target}"
                )
            time.sleep(rng.uniform(0, 0.03))
            assert proc.poll() is None, f"kill {k}: the run finished first"
            _kill(proc)
        if k > 0:  # the rerun started where the last complete folder was, ignoring the planted one
            found = RESUMED.search(log.read_text())
            if on_disk:
                assert found and int(found.group(2)) == on_disk, _tail(log)
                assert found.group(1) == str(run / "last")
            else:
                assert "not saved yet; starting at step 0" in log.read_text(), _tail(log)
            assert planted is None or not planted.exists()
        step = _check_model_folders(run)
        assert step >= on_disk, f"kill {k}: last/ went back from step {on_disk} to {step}"
        on_disk = step
        if on_disk:
            planted = _plant_half_written_last(run, total + 100)

    capsys.readouterr()
    assert _train_here(resume[3:])["step"] == total  # the final rerun, here
    expected = f"at step {on_disk} " if on_disk else "not saved yet; starting at step 0"
    assert expected in capsys.readouterr().err
    assert _check_model_folders(run) == total
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary siblings
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in lines] == [
        (e, e * per_epoch) for e in range(1, EPOCHS + 1)
    ]
    for name in ("last", "best"):  # killed and resumed three times, yet the same as one run
        for key, value in _weights(straight / name).items():
            torch.testing.assert_close(_weights(run / name)[key], value, msg=f"{name}: {key}")


KILLED_AT_EPOCH_END = r"""
import os, signal, sys
from training import train_captioner

def die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)

train_captioner.Captioner.save = die  # the epoch's metrics line is written, its best/ and last/ not
argv = sys.argv[1:]
train_captioner.main(train_captioner.get_args_parser().parse_args(argv), argv)
"""


def test_a_kill_between_an_epochs_metrics_line_and_its_save_logs_the_epoch_once(shapes, tmp_path):
    run = tmp_path / "run"
    argv = ["--data", str(shapes), "--epochs", "2", *TINY, "--device", "cpu", "--out", str(run)]
    argv += ["--save-every", "1"]
    log = tmp_path / "killed.log"
    with _running([sys.executable, "-c", KILLED_AT_EPOCH_END, *argv], log) as proc:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, _tail(log)
    trainer = json.loads((run / "last" / "trainer.json").read_text())
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert trainer["epoch"] == 0 and trainer["batch_in_epoch"] == trainer["step"]  # mid-epoch
    assert [json.loads(line)["epoch"] for line in lines] == [1]  # yet epoch 1 is logged

    assert _train_here(["--out", str(run), "--resume", "--no-progress"])["epoch"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


# -- folder captioning ---------------------------------------------------------------------------


def _caption_cmd(in_dir: Path, out: Path, model: Path, overlays: Path) -> list[str]:
    cmd = [sys.executable, "-m", "training.caption_folder", str(in_dir), "--out", str(out)]
    cmd += ["--model", str(model), "--overlays", str(overlays), "--batch-size", "2"]
    return [*cmd, "--beam-size", "2", "--max-length", "6", "--device", "cpu", "--no-progress"]


def _caption_here(cmd: list[str]) -> dict:
    with _one_thread():
        return caption_folder.main(caption_folder.get_args_parser().parse_args(cmd[3:]))


def _whole_lines(out: Path) -> int:
    try:
        return out.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_folder_captioning_killed_at_random_moments_ends_with_one_line_per_image(tmp_path):
    rng = random.Random(SEED + 1)
    scenes = generate_split(4, seed=5, size=32)
    vocab = Vocabulary.build(c for s in scenes for c in s.captions)
    model = Captioner(tiny_model(len(vocab)), vocab, name="tiny").save(tmp_path / "model")
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    names = []
    for scene in generate_split(16, seed=3, size=32):
        render(scene).save(in_dir / scene.file_name)
        names.append(scene.file_name)
    reference = tmp_path / "straight.jsonl"
    _caption_here(_caption_cmd(in_dir, reference, model, tmp_path / "o1"))

    out, overlays = tmp_path / "out.jsonl", tmp_path / "overlays"
    kills = 0
    # Each kill once OUT holds a random number of lines (and at least one more than the run
    # found), after a random fraction of a batch.
    for k, target in enumerate(sorted(rng.sample(range(1, len(names) - 4), KILLS))):
        target = max(target, _whole_lines(out) + 1)
        log = tmp_path / f"kill{k}.log"
        with _running(_caption_cmd(in_dir, out, model, overlays), log) as proc:
            _wait_until(lambda t=target: _whole_lines(out) >= t, proc, log, f"{target} lines")
            time.sleep(rng.uniform(0, 0.01))
            kills += proc.poll() is None
            _kill(proc)
        *whole, _torn = out.read_bytes().split(b"\n")
        records = [json.loads(line) for line in whole]  # only the last line may be torn
        assert len({r["path"] for r in records}) == len(records), f"kill {k}: a duplicate line"
        for r in records:  # an image gets its overlay strip before its line
            assert (overlays / f"{r['path']}.png").is_file()
    assert kills == KILLS, "a run finished before it could be killed"
    assert 0 < _whole_lines(out) < len(names)

    summary = _caption_here(_caption_cmd(in_dir, out, model, overlays))  # the final rerun, here
    assert summary["captioned"] == len(names) and summary["errors"] == 0
    text = out.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    assert sorted(r["path"] for r in records) == sorted(names)  # none missing, none twice
    assert records == [json.loads(line) for line in reference.read_text().splitlines()]
    for name in names:
        with Image.open(overlays / f"{name}.png") as strip:
            strip.verify()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.jsonl")) == [
        "out.jsonl"
    ]


# -- the service ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class _Load:
    """Threads posting /caption in a loop until it fails; counts answers and what is in flight."""

    def __init__(self, base: str, threads: int = 4):
        self.base, self.done, self.inflight = base, 0, 0
        self.refused: list[str] = []  # answers other than 200 before the kill
        self.cut = 0  # requests the kill broke off (not merely refused a connection)
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _loop(self, seed: int) -> None:
        files = {"image": ("a.png", png(seed), "image/png")}
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                with self.lock:
                    self.inflight += 1
                try:
                    response = client.post(f"{self.base}/caption?beam_size=10", files=files)
                except httpx.TransportError as exc:  # the kill
                    response = None
                    self.cut += not isinstance(exc, httpx.ConnectError)
                with self.lock:
                    self.inflight -= 1
                    if response is not None and response.status_code == 200:
                        self.done += 1
                        continue
                    if response is not None:
                        self.refused.append(f"{response.status_code} {response.text}")
                    return

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_service_killed_with_requests_in_flight_restarts_and_leaves_the_model_alone(tmp_path):
    rng = random.Random(SEED + 2)
    model = save_tiny_captioner(tmp_path / "model")
    before = _tree_hash(model)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    serve = Path(sys.executable).with_name("captioner")
    cmd = [str(serve)] if serve.exists() else [sys.executable, "-m", "api.cli"]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--caption-model", str(model), "--vqa-model", ""]
    for k in range(KILLS + 1):
        log = tmp_path / f"serve{k}.log"
        with _running(cmd, log) as proc:
            _wait_until(lambda: _ready(base), proc, log, "/ready 200", every=0.05)
            response = httpx.post(
                f"{base}/caption?attention=grid", files={"image": ("a.png", png(7), "image/png")}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert isinstance(body["caption"], str) and body["model"]["name"] == "tiny-cap"
            assert (body["attention"]["height"], body["attention"]["width"]) == (4, 4)
            if k == KILLS:
                break
            load = _Load(base)
            try:
                target = rng.randint(1, 6)
                answered = lambda t=target, load=load: load.done >= t or load.refused  # noqa: E731
                _wait_until(answered, proc, log, f"{target} answers")
                _wait_until(lambda load=load: load.inflight > 0, proc, log, "a request in flight")
                _kill(proc)
            finally:
                load.join()
            assert not any(t.is_alive() for t in load.threads)
            assert not load.refused, load.refused
            assert load.done >= target and load.cut >= 1, (load.done, load.cut)
        assert _tree_hash(model) == before, f"kill {k} changed the model folder"
    assert _tree_hash(model) == before
