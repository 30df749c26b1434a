"""The captioner in a process of its own (`Settings.model_process`, api/model_process.py).

Same answers as the captioner in the service's own process (captions, log-probs, attention, the
streamed words); a streamed image that nobody wants any more leaves the child's search; the child
fails a batch with an error it can say, comes back after it dies, never outlives the service (a
graceful stop or a SIGKILL), and a model that cannot load is reported by /ready.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from api.app import create_app
from api.caption_work import Listeners, caption_batch
from api.model_process import CaptionerProcess, ModelProcessError
from captioner.caption.captioner import Captioner
from captioner.paths import DEFAULT_CAPTION_MODEL
from tests.api_fixtures import TestClient, save_tiny_captioner, scene_png, settings, upload
from tests.api_process import start_server, stop
from tests.test_api_stream import split, stream


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, ended but not yet reaped, counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def clients():
    """The demo captioner served twice: in its own process, and in the service's."""
    apart = create_app(settings(caption_model=DEFAULT_CAPTION_MODEL, model_process=True))
    inside = create_app(settings(caption_model=DEFAULT_CAPTION_MODEL, model_process=False))
    with TestClient(apart) as a, TestClient(inside) as b:
        yield a, b


def model_pid(client) -> int:
    pid = client.app.state.services["captioner"].model.pid
    assert pid is not None and pid != os.getpid() and alive(pid)
    return pid


@pytest.mark.parametrize("query", ["?beam_size=1", "?beam_size=3", "?beam_size=5&attention=none"])
def test_captions_are_those_of_the_captioner_in_this_process(clients, query):
    apart, inside = clients
    model_pid(apart)
    for seed in (0, 1):
        data = scene_png(seed)
        a = apart.post(f"/caption{query}", files=upload(data))
        b = inside.post(f"/caption{query}", files=upload(data))
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert a.json() == b.json()
    files = [("image", (f"{k}.png", scene_png(k), "image/png")) for k in range(3)]
    a, b = apart.post("/caption/batch", files=files), inside.post("/caption/batch", files=files)
    assert a.status_code == 200 and a.json() == b.json()
    assert apart.get("/models").json() == inside.get("/models").json()


def test_streamed_words_come_from_the_child_and_make_up_the_result(clients):
    apart, inside = clients
    for query in ("?beam_size=1", "?beam_size=3"):
        words, result = split(stream(apart, scene_png(2), query))
        assert [w["token"] for w in words] == result["tokens"]
        assert [w["index"] for w in words] == list(range(len(result["tokens"])))
        assert [w["attention"]["map"] for w in words] == result["attention"]["maps"]
        assert stream(apart, scene_png(2), query) == stream(inside, scene_png(2), query)


class StopAfter(Listeners):
    """Hears every word; stops wanting row `row` once it has its first `n` words."""

    def __init__(self, row: int, n: int):
        self.row, self.n = row, n
        self.heard: dict[int, list[str]] = {}

    def words(self, row, words):
        self.heard.setdefault(row, []).extend(w.token for w in words)

    def wanted(self, row):
        return row != self.row or len(self.heard.get(row, [])) < self.n


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny captioner's folder, loaded here and in a child (which the tests may kill)."""
    folder = save_tiny_captioner(tmp_path_factory.mktemp("models") / "cap")
    child = CaptionerProcess.start(folder, max_rows=8)
    yield folder, Captioner.load(folder), child
    child.close()


def test_an_image_nobody_wants_leaves_the_childs_search_as_it_leaves_this_ones(tiny):
    """Its result is cut where the search dropped it and the others are whole. The child's flags
    are copied from the listeners while it searches, so it may run a step or two longer than an
    in-process search would (words nobody hears: the client is gone)."""
    folder, here, child = tiny
    torch.manual_seed(0)
    pixels = torch.rand(4, 3, here.input_size, here.input_size)
    options = [(1, 40), (3, 40), (1, 40), (3, 40)]
    streamed = [True, False, True, True]
    whole = caption_batch(here, pixels, options)
    cut = StopAfter(row=0, n=2)
    results = child.caption_batch(pixels, options, streamed, cut)
    assert results[0].tokens[:2] == whole[0].tokens[:2]
    assert len(results[0].tokens) < len(whole[0].tokens)
    for got, want in zip(results[1:], whole[1:]):  # row 2 shared its search with row 0: once
        assert got.tokens == want.tokens  # row 0 left, its matmuls were narrower (float ulps)
        assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-5)
    assert cut.heard[2] == whole[2].tokens and 1 not in cut.heard  # only streamed rows heard
    for row in (2, 3):
        assert cut.heard[row] == results[row].tokens
    assert results[0].tokens[: len(cut.heard[0])] == cut.heard[0]  # cut after what was heard


def test_an_error_in_the_child_is_raised_here_and_the_child_goes_on(tiny):
    folder, here, child = tiny
    pid = child.pid
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\), got \(1, 5, 7, 7\)"):
        child.caption_batch(torch.rand(1, 5, 7, 7), [(1, 5)])
    with pytest.raises(ValueError, match="9 images; this model process takes 8"):
        child.caption_batch(torch.rand(9, 3, 8, 8), [(1, 5)] * 9)
    pixels = torch.rand(2, 3, here.input_size, here.input_size)
    got = child.caption_batch(pixels, [(3, 10)] * 2)
    assert [r.tokens for r in got] == [r.tokens for r in caption_batch(here, pixels, [(3, 10)] * 2)]
    assert child.pid == pid


class Failing(Listeners):
    def words(self, row, words):
        raise RuntimeError("the listener failed")


def test_a_batch_given_up_mid_way_leaves_no_stale_message_for_the_next(tiny):
    """A listener that raises ends the batch here while the child is still at it; the next batch
    gets its own answers (a new child), not what was left of that one."""
    folder, here, child = tiny
    pixels = torch.rand(2, 3, here.input_size, here.input_size)
    old = child.pid
    with pytest.raises(RuntimeError, match="the listener failed"):
        child.caption_batch(pixels, [(1, 10), (1, 10)], [True, True], Failing())
    other = torch.rand(3, 3, here.input_size, here.input_size)
    got = child.caption_batch(other, [(3, 10)] * 3)
    assert [r.tokens for r in got] == [r.tokens for r in caption_batch(here, other, [(3, 10)] * 3)]
    assert child.pid != old


def test_a_child_that_dies_fails_its_batch_and_a_new_one_takes_the_next(tiny):
    folder, here, child = tiny
    pixels = torch.rand(1, 3, here.input_size, here.input_size)
    old = child.pid
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not alive(old))
    with pytest.raises(ModelProcessError, match="ended while captioning"):
        child.caption_batch(pixels, [(1, 10)])
    [got] = child.caption_batch(pixels, [(1, 10)])
    assert child.pid not in (None, old) and alive(child.pid)
    assert got.tokens == caption_batch(here, pixels, [(1, 10)])[0].tokens
    os.kill(child.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole group:
    os.kill(child.pid, signal.SIGTERM)  # the parent's to handle, not the child's
    time.sleep(0.2)
    assert child.caption_batch(pixels, [(1, 10)])[0].tokens == got.tokens


def test_the_service_answers_again_after_its_model_process_is_killed(tmp_path):
    """The request whose batch was running fails (500: a batch that crashed its process is not
    run again, it might crash the next one too); the next one gets a new child."""
    folder = save_tiny_captioner(tmp_path / "cap")
    app = create_app(settings(caption_model=folder, model_process=True))
    with TestClient(app, raise_server_exceptions=False) as client:
        before = client.post("/caption", files=upload(scene_png(0)))
        pid = model_pid(client)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid))
        failed = client.post("/caption", files=upload(scene_png(0)))
        after = client.post("/caption", files=upload(scene_png(0)))
        assert failed.status_code == 500, failed.text
        assert before.status_code == after.status_code == 200, after.text
        assert after.json() == before.json()
        new = model_pid(client)
        assert new != pid
    wait_until(lambda: not alive(new))  # the app's shutdown ends it


def test_fused_attention_is_loaded_in_the_child_and_gives_the_same_answers(clients):
    """CAPTIONER_FUSE_ATTENTION reaches Captioner.load in the child, which compiles while it
    loads; the answers are the eager captioner's (log-probs and attention within rounding)."""
    _, inside = clients
    app = create_app(
        settings(caption_model=DEFAULT_CAPTION_MODEL, model_process=True, fuse_attention=True)
    )
    with TestClient(app) as fused:
        assert fused.get("/ready").status_code == 200
        for seed in (0, 3):
            data = scene_png(seed)
            a = fused.post("/caption?beam_size=3", files=upload(data)).json()
            b = inside.post("/caption?beam_size=3", files=upload(data)).json()
            assert a["tokens"] == b["tokens"]
            assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-5)
            maps = [np.array(r["attention"]["maps"]) for r in (a, b)]
            np.testing.assert_allclose(*maps, atol=1e-5)


def test_a_model_that_cannot_load_in_the_child_is_reported_by_ready(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    app = create_app(settings(caption_model=broken, model_process=True))
    with TestClient(app) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert f"failed to load {broken}" in ready.text
        assert client.post("/caption", files=upload(scene_png(0))).status_code == 503


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_model_process_never_outlives_the_server(tmp_path, how):
    folder = save_tiny_captioner(tmp_path / "cap")
    server = start_server(tmp_path, caption_model=folder, settings={"model_process": True})
    try:
        response = httpx.post(f"{server.base}/caption", files=upload(scene_png(0)), timeout=30)
        assert response.status_code == 200, response.text
        spawned = [p for p in children(server.proc.pid) if alive(p)]  # and a resource tracker
        assert spawned
        os.kill(server.proc.pid, getattr(signal, how))
        server.proc.wait(timeout=30)
        if how == "SIGTERM":
            assert server.proc.returncode == 0, server.log()[-2000:]
        wait_until(lambda: not any(map(alive, spawned)))  # SIGKILL: they read EOF and end
    finally:
        stop(server)
