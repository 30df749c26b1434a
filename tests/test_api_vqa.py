"""POST /vqa through the real app, with a tiny VQA checkpoint."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from api.app import create_app
from captioner.paths import DEFAULT_VQA_MODEL
from captioner.vqa.answerer import Answerer
from tests.api_fixtures import (
    ANSWERS,
    GRID,
    TestClient,
    assert_error,
    coco_photo,
    png,
    save_tiny_vqa,
    scene_png,
    settings,
    upload,
)

VQA_FIELDS = {"question", "answer", "confidence", "top_answers", "attention", "model"} | {
    "unknown_words",
    "known_content_words",
    "domain_score",
    "in_domain",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_vqa(tmp_path_factory.mktemp("models") / "vqa", glimpses=2)


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(settings(vqa_model=model_dir))) as client:
        yield client


def ask(client, question, data=None, query=""):
    return client.post(f"/vqa{query}", files=upload(data or png(1)), data={"question": question})


def cache_counts(client) -> tuple[float, float]:
    """The feature cache's hits and misses, as GET /metrics reports them."""
    text = client.get("/metrics").text
    counts = [
        float(m.group(1))
        for name in ("hits", "misses")
        if (
            m := re.search(
                rf'^captioner_feature_cache_{name}_total{{model="vqa"}} (\S+)$', text, re.M
            )
        )
    ]
    assert len(counts) == 2, text
    return counts[0], counts[1]


def test_vqa_fields(client):
    response = ask(client, "  what color is the circle?  ")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == VQA_FIELDS
    assert body["question"] == "what color is the circle?"
    assert body["answer"] in ANSWERS
    assert body["model"] == {"name": "tiny-vqa", "version": "1"}
    assert len(body["top_answers"]) == 3
    assert all(set(a) == {"answer", "probability"} for a in body["top_answers"])
    assert body["top_answers"][0] == {"answer": body["answer"], "probability": body["confidence"]}
    probabilities = [a["probability"] for a in body["top_answers"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0 < body["confidence"] <= 1


def test_unknown_words_are_listed_and_a_question_about_nothing_known_is_flagged(client):
    known = ask(client, "what color is the circle?").json()
    assert (known["unknown_words"], known["known_content_words"]) == ([], True)
    partly = ask(client, "What color is the Zebra, the zebra?").json()
    assert (partly["unknown_words"], partly["known_content_words"]) == (["zebra"], True)
    # Answered all the same, and flagged: it knows neither "zebra" nor "refrigerator".
    unknown = ask(client, "is the zebra above the refrigerator?").json()
    assert unknown["unknown_words"] == ["zebra", "above", "refrigerator"]
    assert unknown["known_content_words"] is False and unknown["answer"] in ANSWERS
    assert ask(client, "how many shapes?").json()["known_content_words"] is True
    assert ask(client, "how many circles are there?").json()["known_content_words"] is False


def test_vqa_matches_the_library(client, model_dir):
    data = png(2)
    body = ask(client, "is there a square?", data, "?top_k=5").json()
    [expected] = Answerer.load(model_dir).answer([data], ["is there a square?"], top_k=5)
    assert body["answer"] == expected.answer
    assert [a["answer"] for a in body["top_answers"]] == [a for a, _ in expected.top_answers]
    np.testing.assert_allclose(body["confidence"], expected.confidence, atol=1e-5)
    np.testing.assert_allclose(body["attention"]["maps"], expected.attention, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 7, 10])
def test_top_k(client, top_k):
    body = ask(client, "how many shapes are there?", query=f"?top_k={top_k}").json()
    assert len(body["top_answers"]) == min(top_k, len(ANSWERS))


def test_attention_grid_one_map_per_glimpse(client):
    attention = ask(client, "what color is the circle?").json()["attention"]
    assert set(attention) == {"height", "width", "maps"}
    maps = np.array(attention["maps"])
    assert maps.shape == (2, *GRID)  # two glimpses
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-4)


def test_attention_png_and_none(client):
    body = ask(client, "what color is the circle?", query="?attention=png").json()
    overlays = body["attention"]["overlays"]
    assert len(overlays) == 2
    for text in overlays:
        with Image.open(io.BytesIO(base64.b64decode(text))) as im:
            assert im.format == "PNG"
    assert ask(client, "what color?", query="?attention=none").json()["attention"] is None


def test_several_questions_about_one_image_encode_it_once(client):
    data = png(30)
    hits, misses = cache_counts(client)
    answers = [ask(client, q, data).json()["answer"] for q in ("what color?", "how many?", "is?")]
    assert len(answers) == 3
    assert cache_counts(client) == (hits + 2, misses + 1)
    ask(client, "what color?", png(31))  # another image: one more encoder pass
    assert cache_counts(client) == (hits + 2, misses + 2)


def test_cached_features_give_the_same_answer(client):
    data = png(32)
    first = ask(client, "what color is the circle?", data).json()
    again = ask(client, "what color is the circle?", data).json()
    assert again == first


def test_a_model_without_domain_statistics_answers_null(client):
    body = ask(client, "what color is the circle?").json()
    assert (body["domain_score"], body["in_domain"]) == (None, None)


def test_the_demo_vqa_model_flags_a_photo_and_keeps_its_score_with_the_cached_features():
    scene, photo = scene_png(4), coco_photo(1)
    with TestClient(create_app(settings(vqa_model=DEFAULT_VQA_MODEL))) as demo:
        on_scene = ask(demo, "what color is the circle?", scene).json()
        hits, misses = cache_counts(demo)
        on_photo = [
            ask(demo, q, photo).json() for q in ("what color is the circle?", "is there a square?")
        ]
        assert cache_counts(demo) == (hits + 1, misses + 1)  # the photo was encoded once
        openapi = demo.get("/openapi.json").json()["components"]["schemas"]["VQAResponse"]
    assert on_scene["in_domain"] is True
    assert [b["in_domain"] for b in on_photo] == [False, False]
    assert on_photo[1]["domain_score"] == on_photo[0]["domain_score"] > on_scene["domain_score"]
    assert {"domain_score", "in_domain"} <= set(openapi["required"])
    assert "training images" in openapi["properties"]["domain_score"]["description"]


@pytest.mark.parametrize(
    ("question", "needle"),
    [("", "question"), ("   \t ", "empty"), ("x" * 201, "200"), (None, "question")],
)
def test_bad_questions_are_422(client, question, needle):
    data = {} if question is None else {"question": question}
    response = client.post("/vqa", files=upload(png(1)), data=data)
    assert needle in assert_error(response, 422)


def test_question_of_200_characters_is_fine(client):
    assert ask(client, "what " * 39 + "colo?").status_code == 200


@pytest.mark.parametrize("query", ["?top_k=0", "?top_k=11", "?top_k=two", "?attention=heat"])
def test_bad_parameters_are_422(client, query):
    assert_error(ask(client, "what color?", query=query), 422)


def test_missing_image_is_422(client):
    response = client.post("/vqa", data={"question": "what color?"})
    assert "image" in assert_error(response, 422)


def test_bad_image_is_415(client):
    response = client.post(
        "/vqa", files=upload(b"GIF89a nope", "x.gif"), data={"question": "what color?"}
    )
    assert_error(response, 415)


def test_vqa_without_a_model_is_503(tmp_path):
    with TestClient(create_app(settings(caption_model=None, vqa_model=None))) as client:
        response = ask(client, "what color?")
        assert_error(response, 503)
        assert response.headers["Retry-After"].isdigit()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vqa_on_cuda_matches_cpu(model_dir):
    data = png(50)
    with TestClient(create_app(settings(vqa_model=model_dir, device="cuda"))) as client:
        first = ask(client, "what color is the circle?", data).json()
        cached = ask(client, "what color is the circle?", data).json()  # features from the cache
    [expected] = Answerer.load(model_dir).answer([data], ["what color is the circle?"])
    for body in (first, cached):
        assert body["answer"] == expected.answer
        np.testing.assert_allclose(body["confidence"], expected.confidence, atol=1e-4)
        np.testing.assert_allclose(body["attention"]["maps"], expected.attention, atol=1e-4)
