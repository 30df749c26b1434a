"""POST /caption/stream: word events as the search fixes them, then the /caption result.

In-process (TestClient) for the events and the errors; a real uvicorn server in a subprocess,
its decoder slowed down, for a client that leaves mid-caption.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from api.app import create_app
from captioner.caption.captioner import Captioner
from captioner.paths import DEFAULT_CAPTION_MODEL
from captioner.vocab import Vocabulary
from tests.api_fixtures import (
    TestClient,
    assert_error,
    gate_captioner,
    png,
    save_tiny_captioner,
    scene_png,
    settings,
    upload,
)
from tests.api_process import start_server, stop
from tests.conftest import scripted_model


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """(event, data) of each event of a `text/event-stream` body; comment lines are skipped."""
    events = []
    for block in text.replace("\r\n", "\n").strip().split("\n\n"):
        event, data = "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        events.append((event, json.loads("\n".join(data))))
    return events


def stream(client, data: bytes, query: str = "") -> list[tuple[str, dict]]:
    response = client.post(f"/caption/stream{query}", files=upload(data))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)


def split(events):
    """The word events' data and the result's; asserts the stream's shape."""
    *words, (last, result) = events
    assert last == "result", events[-1]
    assert all(name == "word" for name, _ in words), [name for name, _ in words]
    return [w for _, w in words], result


@pytest.fixture(scope="module")
def demo_client():
    app = create_app(settings(caption_model=DEFAULT_CAPTION_MODEL))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def tiny_client(tmp_path_factory):
    folder = save_tiny_captioner(tmp_path_factory.mktemp("models") / "cap")
    with TestClient(create_app(settings(caption_model=folder))) as client:
        yield client


@pytest.mark.parametrize("beam_size", [1, 3, 5])
@pytest.mark.parametrize("model", ["demo", "tiny"])
def test_words_concatenate_to_the_result_which_is_the_caption_route_s(
    model, beam_size, demo_client, tiny_client
):
    client = demo_client if model == "demo" else tiny_client
    for seed in range(3):
        data = scene_png(seed) if model == "demo" else png(seed)
        query = f"?beam_size={beam_size}"
        words, result = split(stream(client, data, query))
        plain = client.post(f"/caption{query}", files=upload(data)).json()
        assert result == plain
        assert [w["index"] for w in words] == list(range(len(result["tokens"])))
        assert [w["token"] for w in words] == result["tokens"]
        assert [w["logprob"] for w in words] == result["token_logprobs"]
        assert all(
            w["probability"] == pytest.approx(2.718281828459045 ** w["logprob"]) for w in words
        )
        maps = result["attention"]["maps"]
        for word, want in zip(words, maps, strict=True):
            attention = word["attention"]
            assert (attention["height"], attention["width"]) == (
                result["attention"]["height"],
                result["attention"]["width"],
            )
            assert attention["map"] == want  # the same map, rounded the same way
        if model == "demo":
            assert result["caption"].startswith("a ") and len(words) >= 4


def test_png_and_no_attention_formats(tiny_client):
    words, result = split(stream(tiny_client, png(7), "?attention=png&max_length=4"))
    assert [w["attention"]["overlay"] for w in words] == result["attention"]["overlays"]
    words, result = split(stream(tiny_client, png(7), "?attention=none&max_length=4"))
    assert result["attention"] is None and all(w["attention"] is None for w in words)
    assert [w["token"] for w in words] == result["tokens"]


def test_errors_before_the_first_event_keep_the_status_codes(tiny_client):
    assert "image" in assert_error(tiny_client.post("/caption/stream", files=upload(b"no")), 415)
    assert_error(tiny_client.post("/caption/stream?beam_size=0", files=upload(png(1))), 422)
    assert_error(tiny_client.post("/caption/stream?attention=svg", files=upload(png(1))), 422)
    assert_error(tiny_client.post("/caption/stream"), 422)
    big = png(1, size=(2000, 1000))  # over the test settings' 1 MB upload cap
    assert_error(tiny_client.post("/caption/stream", files=upload(big)), 413)


def test_api_key_queue_full_and_timeout_are_answered_before_streaming(tmp_path):
    folder = save_tiny_captioner(tmp_path / "cap")
    app = create_app(
        settings(
            caption_model=folder, api_key="k", max_queue=1, max_batch_images=1, request_timeout_s=1
        )
    )
    with TestClient(app) as client:
        assert_error(client.post("/caption/stream", files=upload(png(1))), 401)
        key = {"X-API-Key": "k"}
        gated = gate_captioner(client)
        # The model is held: a streamed caption's first word cannot come within the 1 s limit.
        late = client.post("/caption/stream", files=upload(png(1)), headers=key)
        assert "1 s limit" in assert_error(late, 504)
        held = threading.Thread(
            target=lambda: client.post("/caption", files=upload(png(2)), headers=key)
        )
        held.start()
        batcher = client.app.state.services["captioner"].batcher
        deadline = time.monotonic() + 10
        while batcher.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        full = client.post("/caption/stream", files=upload(png(3)), headers=key)
        assert_error(full, 503)
        assert int(full.headers["retry-after"]) > 0
        gated.gate.set()
        held.join(20)
        words, result = split(stream_with(client, png(4), key))
        assert [w["token"] for w in words] == result["tokens"]


def stream_with(client, data, headers):
    response = client.post("/caption/stream", files=upload(data), headers=headers)
    assert response.status_code == 200, response.text
    return parse_sse(response.text)


# A real server whose every decoder step takes 0.1 s longer: a 40-word caption takes 4 s.
SLOW_STEPS = """
import time
from captioner.caption.decoder import CaptionDecoder

step = CaptionDecoder.step

def slow_step(self, *args, **kwargs):
    time.sleep(0.1)
    return step(self, *args, **kwargs)

CaptionDecoder.step = slow_step
"""


@pytest.mark.slow  # a server of its own: about 5 s
def test_a_client_that_disconnects_stops_its_search_and_frees_the_model(tmp_path):
    words = [f"w{i}" for i in range(40)]
    vocab = Vocabulary.build([" ".join(words)])
    model = scripted_model(vocab, words, embed_dim=48)
    folder = Captioner(model, vocab, name="scripted").save(tmp_path / "scripted")
    server = start_server(
        tmp_path,
        caption_model=folder,
        settings={"max_batch_size": 1, "max_batch_delay_ms": 0},
        prelude=SLOW_STEPS,
    )
    try:
        with httpx.Client(timeout=30) as client:
            url = f"{server.base}/caption/stream?beam_size=1&max_length=50"
            with client.stream("POST", url, files=upload(png(1))) as response:
                assert response.status_code == 200
                seen = ""
                for chunk in response.iter_text():
                    seen += chunk
                    if "event: word" in seen:
                        break
            # The stream is closed after its first word: the search for it must stop, and the
            # next request get the model at once (not after the 39 words left, ~4 s).
            started = time.monotonic()
            quick = httpx.post(
                f"{server.base}/caption?beam_size=1&max_length=2", files=upload(png(2)), timeout=30
            )
            waited = time.monotonic() - started
            assert quick.status_code == 200 and quick.json()["tokens"] == ["w0", "w1"]
            assert waited < 2.5, f"the next request waited {waited:.1f} s for the model"
            metrics = httpx.get(f"{server.base}/metrics").text
            assert 'captioner_caption_streams_total{outcome="disconnected"} 1.0' in metrics
            # A stream read to its end is counted as completed, its words the whole caption.
            full = httpx.post(
                f"{server.base}/caption/stream?beam_size=1&max_length=5",
                files=upload(png(3)),
                timeout=30,
            )
            streamed, result = split(parse_sse(full.text))
            assert [w["token"] for w in streamed] == result["tokens"] == words[:5]
            metrics = httpx.get(f"{server.base}/metrics").text
            assert 'captioner_caption_streams_total{outcome="completed"} 1.0' in metrics
    finally:
        stop(server)
