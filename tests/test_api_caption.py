"""POST /caption and /caption/batch through the real app, with a tiny checkpoint."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from api.app import create_app
from api.routes.caption import INLINE_ATTENTION_VALUES, response_bodies
from captioner.caption.captioner import Captioner
from captioner.paths import DEFAULT_CAPTION_MODEL
from captioner.results import AttentionFormat, CaptionResult
from tests.api_fixtures import (
    GRID,
    TestClient,
    assert_error,
    coco_photo,
    noise_image,
    png,
    save_tiny_captioner,
    scene_png,
    settings,
    upload,
)

CAPTION_FIELDS = {
    *("caption", "tokens", "token_logprobs", "score", "attention", "model", "finished"),
    *("domain_score", "in_domain"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_captioner(tmp_path_factory.mktemp("models") / "cap")


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(settings(caption_model=model_dir))) as client:
        yield client


@pytest.fixture(scope="module")
def captioner(model_dir):
    return Captioner.load(model_dir)


def test_caption_fields_and_grid_attention(client):
    response = client.post("/caption", files=upload(png(1)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == CAPTION_FIELDS
    assert body["model"] == {"name": "tiny-cap", "version": "1"}
    assert isinstance(body["caption"], str)
    assert all(isinstance(t, str) for t in body["tokens"])
    assert len(body["token_logprobs"]) == len(body["tokens"]) > 0
    assert all(lp <= 0 for lp in body["token_logprobs"])
    attention = body["attention"]
    assert set(attention) == {"height", "width", "maps"}
    assert (attention["height"], attention["width"]) == GRID
    maps = np.array(attention["maps"])
    assert maps.shape == (len(body["tokens"]), *GRID)
    assert (maps >= 0).all()
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-4)


def test_caption_matches_the_library(client, captioner):
    data = png(2)
    body = client.post("/caption?beam_size=2&max_length=7", files=upload(data)).json()
    [expected] = captioner.caption([data], beam_size=2, max_length=7)
    assert body["caption"] == expected.caption
    assert body["tokens"] == expected.tokens
    np.testing.assert_allclose(body["token_logprobs"], expected.token_logprobs, atol=1e-5)
    np.testing.assert_allclose(body["attention"]["maps"], expected.attention, atol=1e-5)


def test_defaults_are_beam_3_length_20(client, captioner):
    data = png(3)
    body = client.post("/caption", files=upload(data)).json()
    [expected] = captioner.caption([data], beam_size=3, max_length=20)
    assert body["tokens"] == expected.tokens


def test_max_length_caps_the_caption(client):
    body = client.post("/caption?max_length=1", files=upload(png(4))).json()
    assert len(body["tokens"]) <= 1


def test_finished_says_whether_the_model_ended_the_caption_or_max_length_cut_it(tmp_path):
    from captioner.vocab import Vocabulary
    from tests.conftest import TINY_CAPTIONS, scripted_model

    vocab = Vocabulary.build(TINY_CAPTIONS)
    model = scripted_model(vocab, ["two", "green", "triangles"])
    folder = Captioner(model, vocab, name="scripted").save(tmp_path / "scripted")
    with TestClient(create_app(settings(caption_model=folder))) as client:
        ended = client.post("/caption", files=upload(png(1))).json()
        assert (ended["caption"], ended["finished"]) == ("two green triangles", True)
        cut = client.post("/caption?max_length=2", files=upload(png(1))).json()
        assert (cut["caption"], cut["finished"]) == ("two green", False)
        files = [("image", (f"{i}.png", png(i), "image/png")) for i in range(2)]
        batch = client.post("/caption/batch?max_length=4", files=files).json()["results"]
        assert [r["finished"] for r in batch] == [True, True]
        # Three words in three steps: the search stops before the model can write <end>.
        batch = client.post("/caption/batch?max_length=3", files=files).json()["results"]
        assert [r["finished"] for r in batch] == [False, False]
        batch = client.post("/caption/batch?max_length=1", files=files).json()["results"]
        assert [(r["tokens"], r["finished"]) for r in batch] == [(["two"], False)] * 2


def test_attention_none_is_null(client):
    body = client.post("/caption?attention=none", files=upload(png(5))).json()
    assert set(body) == CAPTION_FIELDS
    assert body["attention"] is None


def test_png_attention_overlays_decode(client):
    source = noise_image(6, size=(40, 24))
    buf = io.BytesIO()
    source.save(buf, "PNG")
    body = client.post("/caption?attention=png&max_length=3", files=upload(buf.getvalue())).json()
    attention = body["attention"]
    assert set(attention) == {"height", "width", "overlays"}
    assert (attention["height"], attention["width"]) == GRID
    assert len(attention["overlays"]) == len(body["tokens"]) > 0
    for text in attention["overlays"]:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
            assert im.format == "PNG"
            assert im.size == source.size  # drawn over the uploaded image


def test_response_bodies_leave_the_event_loop_for_png_and_large_grids(captioner):
    image = noise_image(7)
    [small] = captioner.caption([image], max_length=3)
    large = dataclasses.replace(small, attention=np.ones((INLINE_ATTENTION_VALUES + 1, 1, 1)))
    threads: list[int] = []

    class Watched(CaptionResult):
        def to_dict(self, attention=AttentionFormat.grid, image=None):
            threads.append(threading.get_ident())
            return super().to_dict(attention, image)

    async def off_the_loop(result: CaptionResult, fmt: AttentionFormat) -> bool:
        threads.clear()
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
        [body] = await response_bodies([Watched(**fields)], fmt, [image])
        assert body == result.to_dict(fmt, image)
        return threads != [threading.get_ident()]

    assert not asyncio.run(off_the_loop(small, AttentionFormat.none))
    assert not asyncio.run(off_the_loop(small, AttentionFormat.grid))  # 3 x 4 x 4 values
    assert asyncio.run(off_the_loop(small, AttentionFormat.png))
    assert asyncio.run(off_the_loop(large, AttentionFormat.grid))


def test_model_without_attention_returns_null(tmp_path):
    folder = save_tiny_captioner(tmp_path / "plain", attention=False, name="plain")
    with TestClient(create_app(settings(caption_model=folder))) as client:
        for mode in ("grid", "png"):
            body = client.post(f"/caption?attention={mode}", files=upload(png(1))).json()
            assert body["attention"] is None
            assert body["model"]["name"] == "plain"


def test_batch_results_in_order_equal_single_requests(client):
    images = [png(seed) for seed in (10, 11, 12)]
    files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = client.post("/caption/batch?beam_size=2", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"results"}
    assert len(body["results"]) == 3
    singles = [client.post("/caption?beam_size=2", files=upload(d)).json() for d in images]
    assert len({tuple(s["token_logprobs"]) for s in singles}) == 3  # the images differ
    for got, single in zip(body["results"], singles, strict=True):
        assert set(got) == CAPTION_FIELDS
        assert got["tokens"] == single["tokens"]
        np.testing.assert_allclose(got["token_logprobs"], single["token_logprobs"], atol=1e-5)
        np.testing.assert_allclose(got["attention"]["maps"], single["attention"]["maps"], atol=1e-5)


def test_batch_with_one_bad_image_names_it(client):
    files = [
        ("image", ("good.png", png(1), "image/png")),
        ("image", ("notes.txt", b"just some text", "text/plain")),
    ]
    detail = assert_error(client.post("/caption/batch", files=files), 415)
    assert "index 1" in detail and "notes.txt" in detail


def test_batch_over_the_image_count_is_413(client):
    files = [("image", (f"{i}.png", png(i), "image/png")) for i in range(9)]  # cap is 8
    assert "at most 8" in assert_error(client.post("/caption/batch", files=files), 413)


def test_batch_needs_an_image(client):
    assert_error(client.post("/caption/batch", data={"other": "x"}), 422)


def test_openapi_describes_the_caption_contract(client):
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/caption"]["post"]
    params = {p["name"]: p["schema"] for p in post["parameters"]}
    assert params["beam_size"]["minimum"] == 1 and params["beam_size"]["maximum"] == 10
    assert params["max_length"]["minimum"] == 1 and params["max_length"]["maximum"] == 50
    assert "multipart/form-data" in post["requestBody"]["content"]
    response = schema["components"]["schemas"]["CaptionResponse"]
    assert set(response["properties"]) == CAPTION_FIELDS
    assert {"200", "413", "415", "422", "503", "504"} <= set(post["responses"])


def test_a_model_without_domain_statistics_answers_null(client):
    body = client.post("/caption", files=upload(png(1))).json()
    assert (body["domain_score"], body["in_domain"]) == (None, None)
    [model] = client.get("/models").json()["models"]
    assert model["domain"] is None


def test_the_demo_captioner_finds_a_scene_in_domain_and_a_photo_not():
    scene, photo = scene_png(3), coco_photo(0)
    with TestClient(create_app(settings(caption_model=DEFAULT_CAPTION_MODEL))) as demo:
        single = [demo.post("/caption", files=upload(data)).json() for data in (scene, photo)]
        files = [
            ("image", ("scene.png", scene, "image/png")),
            ("image", ("p.jpg", photo, "image/jpeg")),
        ]
        batch = demo.post("/caption/batch", files=files).json()["results"]
        [model] = demo.get("/models").json()["models"]
    assert [b["in_domain"] for b in single] == [True, False]
    assert single[1]["domain_score"] > model["domain"]["threshold"] >= single[0]["domain_score"]
    assert "synthetic shapes-world scenes" in model["domain"]["description"]
    assert [b["in_domain"] for b in batch] == [True, False]
    for one, many in zip(single, batch, strict=True):
        assert many["domain_score"] == pytest.approx(one["domain_score"], rel=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_caption_on_cuda_matches_cpu(model_dir, captioner):
    images = [png(seed) for seed in (40, 41)]
    with TestClient(create_app(settings(caption_model=model_dir, device="cuda"))) as client:
        assert client.get("/ready").status_code == 200
        single = client.post("/caption?attention=png", files=upload(images[0]))
        assert single.status_code == 200, single.text
        files = [("image", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
        batch = client.post("/caption/batch", files=files).json()["results"]
    for got, expected in zip(batch, captioner.caption(images), strict=True):
        assert got["tokens"] == expected.tokens
        np.testing.assert_allclose(got["token_logprobs"], expected.token_logprobs, atol=1e-4)
        np.testing.assert_allclose(got["attention"]["maps"], expected.attention, atol=1e-4)
