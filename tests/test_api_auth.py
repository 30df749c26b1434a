"""The API key: required on model endpoints and /metrics when configured; /health, /ready open."""

from __future__ import annotations

import pytest

from api.app import create_app
from tests.api_fixtures import TestClient, assert_error, png, save_tiny_captioner, settings, upload

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = save_tiny_captioner(tmp_path_factory.mktemp("models") / "cap")
    with TestClient(create_app(settings(caption_model=folder, api_key=KEY))) as client:
        yield client


def post_caption(client, headers=None):
    return client.post("/caption?max_length=2", files=upload(png(1)), headers=headers or {})


def test_missing_key_is_401(client):
    response = post_caption(client)
    assert "missing API key" in assert_error(response, 401)
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}x"},
        {"X-API-Key": "wrong"},
        {"X-API-Key": KEY[:-1]},
    ],
)
def test_wrong_key_is_401(client, headers):
    assert_error(post_caption(client, headers), 401)


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}])
def test_right_key_is_accepted(client, headers):
    assert post_caption(client, headers).status_code == 200


def test_key_checked_before_bad_input(client):
    response = client.post("/caption?beam_size=99", files=upload(b"not an image"))
    assert_error(response, 401)


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/metrics"), ("get", "/models"), ("post", "/vqa"), ("post", "/caption/batch")],
)
def test_protected_endpoints(client, method, path):
    assert_error(getattr(client, method)(path), 401)


def test_open_endpoints(client):
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    assert client.get("/").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/redoc").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/samples/scene?seed=1&size=32").status_code == 200  # no model involved
    assert client.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200


def test_openapi_declares_both_schemes(client):
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}


def test_no_key_configured_means_open(tmp_path):
    folder = save_tiny_captioner(tmp_path / "cap")
    with TestClient(create_app(settings(caption_model=folder))) as client:
        assert post_caption(client).status_code == 200
        assert post_caption(client, {"X-API-Key": "anything"}).status_code == 200
