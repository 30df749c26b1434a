"""Settings from CAPTIONER_* variables, and refusal of settings that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from api.settings import Settings, get_settings
from captioner.paths import DEFAULT_CAPTION_MODEL, DEFAULT_VQA_MODEL


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("CAPTIONER_"):
            monkeypatch.delenv(name)


def test_defaults():
    s = Settings()
    assert s.caption_model == DEFAULT_CAPTION_MODEL and s.caption_model.is_absolute()
    assert s.vqa_model == DEFAULT_VQA_MODEL
    assert s.device == "cpu"
    assert s.api_key is None
    assert s.max_upload_bytes == 10 * 1024 * 1024
    assert s.max_pixels == 40_000_000
    assert (s.max_batch_size, s.max_batch_delay_ms, s.max_queue) == (16, 0.0, 64)
    assert s.request_timeout_s == 30
    assert s.cors_origins == []


def test_environment(monkeypatch, tmp_path):
    env = {
        "CAPTIONER_CAPTION_MODEL": str(tmp_path / "cap"),
        "CAPTIONER_VQA_MODEL": "",
        "CAPTIONER_API_KEY": "zq-secret-zq",
        "CAPTIONER_MAX_UPLOAD_BYTES": "1234",
        "CAPTIONER_MAX_BATCH_SIZE": "1",
        "CAPTIONER_MAX_BATCH_DELAY_MS": "2.5",
        "CAPTIONER_DEVICE": "cuda:1",
        "CAPTIONER_CORS_ORIGINS": "https://a.example, https://b.example",
        "CAPTIONER_LOG_LEVEL": "debug",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert s.caption_model == tmp_path / "cap"
    assert s.vqa_model is None  # empty disables
    assert s.api_key is not None and s.api_key.get_secret_value() == "zq-secret-zq"
    assert "zq-secret-zq" not in repr(s)
    assert (s.max_upload_bytes, s.max_batch_size, s.max_batch_delay_s) == (1234, 1, 0.0025)
    assert s.device == "cuda:1"
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.log_level == "DEBUG"


def test_cors_as_json(monkeypatch):
    monkeypatch.setenv("CAPTIONER_CORS_ORIGINS", '["https://a.example"]')
    assert Settings().cors_origins == ["https://a.example"]


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queue": 0}, "max_queue"),
        ({"max_batch_delay_ms": -1}, "max_batch_delay_ms"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"max_upload_bytes": 0}, "max_upload_bytes"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"device": "gpu"}, "device"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"max_queue": 4, "max_batch_images": 8}, "max_queue (4) must be >= max_batch_images"),
        ({"api_key": " padded "}, "whitespace"),
        ({"quantize": "int4"}, "quantize"),
        ({"quantize": "int8", "device": "cuda"}, "CPU only"),
        ({"quantize": "int8", "fuse_attention": True}, "fuse_attention works on float weights"),
    ],
)
def test_unsafe_settings_are_refused(values, needle):
    with pytest.raises(ValidationError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Settings(**values)


def test_empty_api_key_means_none():
    assert Settings(api_key="").api_key is None


def test_empty_quantize_means_float(monkeypatch):
    monkeypatch.setenv("CAPTIONER_QUANTIZE", "")
    assert Settings().quantize is None
    monkeypatch.setenv("CAPTIONER_QUANTIZE", "int8")
    assert Settings().quantize == "int8"


def test_get_settings_is_cached():
    get_settings.cache_clear()
    try:
        assert get_settings() is get_settings()
    finally:
        get_settings.cache_clear()


def test_paths_are_paths():
    assert isinstance(Settings(caption_model="some/folder").caption_model, Path)
