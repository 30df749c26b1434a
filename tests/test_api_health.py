"""/health, /ready, /metrics, /models, the web page, the OpenAPI schema and request logs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from api.app import create_app
from api.logs import JsonFormatter
from tests.api_fixtures import (
    TestClient,
    assert_error,
    png,
    save_tiny_captioner,
    save_tiny_vqa,
    settings,
    upload,
)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_captioner(root / "cap"), save_tiny_vqa(root / "vqa")


@pytest.fixture(scope="module")
def client(model_dirs):
    cap, vqa = model_dirs
    with TestClient(create_app(settings(caption_model=cap, vqa_model=vqa))) as client:
        yield client


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "models": {"captioner": "loaded", "vqa": "loaded"},
    }


def test_bad_model_folder_keeps_serving_health(tmp_path, model_dirs, caplog):
    missing = tmp_path / "no-such-model"
    app = create_app(settings(caption_model=missing, vqa_model=model_dirs[1]))
    with caplog.at_level(logging.ERROR, logger="captioner.api"), TestClient(app) as client:
        assert client.get("/health").status_code == 200
        detail = assert_error(client.get("/ready"), 503)
        assert "captioner" in detail and "no-such-model" in detail
        response = client.post("/caption", files=upload(png(1)))
        assert "captioner" in assert_error(response, 503)
        assert response.headers["Retry-After"].isdigit()
        # the other model still works
        ok = client.post("/vqa", files=upload(png(1)), data={"question": "what color?"})
        assert ok.status_code == 200
        assert [m["kind"] for m in client.get("/models").json()["models"]] == ["vqa"]
        assert "captioner_model_loaded" in client.get("/metrics").text
    assert any("failed to load" in r.getMessage() for r in caplog.records)


def test_corrupt_model_folder_is_reported(tmp_path):
    folder = save_tiny_captioner(tmp_path / "cap")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with TestClient(create_app(settings(caption_model=folder))) as client:
        assert "safetensors" in assert_error(client.get("/ready"), 503)


def test_ready_with_one_model_disabled(model_dirs):
    with TestClient(create_app(settings(caption_model=model_dirs[0]))) as client:
        response = client.get("/ready")
        assert response.status_code == 200
        assert response.json()["models"] == {"captioner": "loaded", "vqa": "disabled"}


def test_no_models_is_not_ready():
    with TestClient(create_app(settings())) as client:
        assert "no model" in assert_error(client.get("/ready"), 503)


def test_models_metadata(client):
    models = {m["kind"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"captioner", "vqa"}
    cap = models["captioner"]
    assert cap["name"] == "tiny-cap" and cap["version"] == "1"
    assert cap["encoder"] == "small_cnn"
    assert cap["decoder"] == "lstm"
    assert cap["vocabulary_size"] > 5
    assert cap["attention_grid"] == [4, 4]
    assert cap["training_data"] == {"dataset": "tiny"}
    assert cap["metrics"] == {"bleu4": 0.5}
    vqa = models["vqa"]
    for field in ("name", "version", "encoder", "vocabulary_size", "attention_grid"):
        assert vqa[field] is not None
    assert vqa["metrics"] == {"accuracy": 0.1}


def test_metrics_names(client):
    client.post("/caption", files=upload(png(1)))
    client.post("/vqa", files=upload(png(1)), data={"question": "what color?"})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "captioner_http_requests_total",
        "captioner_http_request_duration_seconds_bucket",
        "captioner_batch_size_bucket",
        "captioner_batch_duration_seconds_bucket",
        "captioner_queue_depth",
        "captioner_model_load_seconds",
        "captioner_model_loaded",
        "captioner_feature_cache_hits_total",
        "captioner_feature_cache_misses_total",
    ):
        assert name in text, name
    assert 'route="/caption",status="200"' in text
    assert 'captioner_model_loaded{model="vqa"} 1.0' in text


def test_metrics_are_per_app(model_dirs):
    with TestClient(create_app(settings(caption_model=model_dirs[0]))) as client:
        text = client.get("/metrics").text
        assert 'route="/caption"' not in text  # nothing from the other apps in this process


def test_web_page_and_static(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower()
    assert client.get("/static/index.html").status_code == 200


def test_openapi_lists_the_endpoints(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {
        "/caption",
        "/caption/batch",
        "/vqa",
        "/health",
        "/ready",
        "/metrics",
        "/models",
    } <= set(paths)
    schemas = schema["components"]["schemas"]
    for name in ("CaptionResponse", "CaptionBatchResponse", "VQAResponse", "ErrorResponse"):
        assert name in schemas
    assert set(schemas["VQAResponse"]["properties"]) == {
        "question",
        "answer",
        "confidence",
        "top_answers",
        "attention",
        "model",
        "unknown_words",
        "known_content_words",
        "domain_score",
        "in_domain",
    }
    assert set(schemas["AnswerProbability"]["properties"]) == {"answer", "probability"}
    assert client.get("/docs").status_code == 200


def test_request_log_is_one_json_line(client, caplog):
    with caplog.at_level(logging.INFO, logger="captioner.api"):
        response = client.post("/caption", files=upload(png(1)), headers={"X-Request-ID": "abc-1"})
    assert response.headers["X-Request-ID"] == "abc-1"
    [record] = [r for r in caplog.records if getattr(r, "fields", {}).get("path") == "/caption"]
    line = JsonFormatter().format(record)
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["request_id"] == "abc-1"
    assert fields["method"] == "POST" and fields["status"] == 200
    assert fields["batch_size"] == 1
    assert fields["duration_ms"] > 0
    assert set(fields) == {  # what a request line holds: never any upload content
        "time",
        "level",
        "logger",
        "message",
        "request_id",
        "method",
        "path",
        "route",
        "status",
        "duration_ms",
        "batch_size",
    }


def test_request_id_is_made_when_missing_or_odd(client):
    made = client.get("/health").headers["X-Request-ID"]
    assert len(made) == 32
    odd = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert odd.headers["X-Request-ID"] != "bad id\twith spaces"


def test_cors_only_when_configured(model_dirs):
    origin = {"Origin": "https://example.org"}
    with TestClient(create_app(settings())) as client:
        assert "access-control-allow-origin" not in client.get("/health", headers=origin).headers
    app = create_app(settings(cors_origins=["https://example.org"]))
    with TestClient(app) as client:
        headers = client.get("/health", headers=origin).headers
        assert headers["access-control-allow-origin"] == "https://example.org"
        preflight = client.options(
            "/caption",
            headers={**origin, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200


def test_importing_api_loads_nothing():
    code = "import api, sys; print('torch' in sys.modules, 'fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_models_return_each_models_card(client, model_dirs):
    from captioner.caption.captioner import Captioner

    models = {m["kind"]: m for m in client.get("/models").json()["models"]}
    cap = models["captioner"]["card"]
    assert cap == Captioner.load(model_dirs[0]).card.to_dict()
    assert (
        cap["kind"] == "captioner"
        and cap["vocabulary_size"] == models["captioner"]["vocabulary_size"]
    )
    assert models["vqa"]["card"]["answers"] == models["vqa"]["num_answers"]
    for name in ("tiny-cap", "tiny-vqa"):
        response = client.get(f"/models/{name}/card")
        assert response.status_code == 200, response.text
        assert response.json() == models["captioner" if name == "tiny-cap" else "vqa"]["card"]
    detail = assert_error(client.get("/models/nope/card"), 404)
    assert "'nope'" in detail and "'tiny-cap'" in detail and "'tiny-vqa'" in detail
    schema = client.get("/openapi.json").json()
    card = schema["components"]["schemas"]["ModelCardResponse"]
    assert {"summary", "domain", "intended_use", "limitations", "tests"} <= set(card["properties"])
    assert "/models/{name}/card" in schema["paths"]


def test_the_demo_models_cards_say_they_know_only_synthetic_scenes():
    from pathlib import Path

    models = Path(__file__).resolve().parent.parent / "models"
    demo = settings(caption_model=models / "shapes-captioner", vqa_model=models / "easy-vqa")
    with TestClient(create_app(demo)) as client:
        cards = {m["name"]: m["card"] for m in client.get("/models").json()["models"]}
    assert set(cards) == {"shapes-captioner", "easy-vqa"}
    for name, card in cards.items():
        assert "synthetic" in card["domain"].lower(), name
        assert "not meant for real photos" in card["summary"], name
        assert card["data"]["command"].startswith("python -m training.make_"), name
        assert card["tests"] and card["tests"][0]["command"].startswith("python -m training."), name
