"""Service settings, read from `CAPTIONER_*` environment variables (pydantic-settings).

    CAPTIONER_CAPTION_MODEL=models/my-captioner CAPTIONER_API_KEY=s3cret captioner serve

A model path set to the empty string disables that model. Settings that could not work together
(a queue shorter than one batch request, a zero batch size, ...) are refused at startup with an
error naming the variable, rather than failing on the first request.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from captioner.image import DEFAULT_MAX_PIXELS
from captioner.paths import DEFAULT_CAPTION_MODEL, DEFAULT_VQA_MODEL

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAPTIONER_", extra="ignore", frozen=True)

    # Model folders; None (or "" in the environment) disables that model.
    caption_model: Path | None = DEFAULT_CAPTION_MODEL
    vqa_model: Path | None = DEFAULT_VQA_MODEL
    device: str = "cpu"
    quantize: Literal["int8"] | None = None  # int8 LSTM and linear layers (CPU); "" is None
    # The captioner in a process of its own (api/model_process.py): the event loop's Python then
    # never holds up the search (bench/serve.py measures both). Off: in this process's worker
    # thread, as the VQA model always is (one torch fewer in memory, no start-up of a child).
    model_process: bool = True
    # The captioner's attention energy as one compiled loop (Captioner.fuse_attention), compiled
    # while the model loads; pays on CPUs whose eager tanh pass is slow. Not with `quantize`.
    fuse_attention: bool = False

    # When set, every model endpoint needs `Authorization: Bearer <key>` or `X-API-Key: <key>`.
    api_key: SecretStr | None = None

    # Upload limits.
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)  # per image
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # width x height, checked from the header
    max_batch_images: int = Field(16, ge=1)  # images in one /caption/batch request

    # Micro-batching: concurrent requests share one encoder and one decoder pass.
    max_batch_size: int = Field(16, ge=1)  # 1 turns batching off
    # How long a batch may wait to fill. 0: a batch starts as soon as the model is free, with all
    # that waits (requests gather while the model runs): with the model in its own process, a
    # 10 ms wait left it idle while requests trickled in (bench/serve.py, README).
    max_batch_delay_ms: float = Field(0.0, ge=0, le=10_000)
    max_queue: int = Field(64, ge=1)  # images waiting per model; beyond that 503 + Retry-After
    request_timeout_s: float = Field(30.0, gt=0)
    feature_cache_items: int = Field(256, ge=0)  # VQA image features kept; 0 disables the cache
    # Seconds an idle HTTP connection stays open. Longer than the idle timeouts of clients and load
    # balancers (httpx 5 s, nginx and AWS ALB 60 s), so that they close idle connections, not the
    # service: a server that closes first can reset a request already on its way (uvicorn's 5 s
    # default against httpx's 5 s dropped requests under overload in bench/soak.py).
    keep_alive_s: float = Field(75.0, gt=0, le=3600)
    # A response sent before the request body was read (a 413 for an oversized upload) is followed
    # by reading and discarding the rest of the body, up to these bounds, before the connection
    # closes: closing with bytes unread resets the connection, and a client that sends its whole
    # body before reading (urllib, requests) then never sees the answer (api/linger.py).
    linger_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    linger_s: float = Field(30.0, ge=0, le=3600)
    # On SIGTERM or SIGINT: new requests get 503, running ones may finish for this long (less two
    # seconds), then get 503 too, and the process exits within it (api/graceful.py). Below
    # Kubernetes' default terminationGracePeriodSeconds (30 s), after which it kills the process.
    shutdown_grace_s: float = Field(20.0, gt=0, le=3600)

    cors_origins: Annotated[list[str], NoDecode] = []
    log_level: str = "INFO"

    @field_validator("caption_model", "vqa_model", mode="before")
    @classmethod
    def _empty_disables(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        return Path(value).expanduser()

    @field_validator("quantize", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip() == "" else value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and value == "":
            return None
        return value

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip() != value.get_secret_value():
            raise ValueError("api_key must not start or end with whitespace")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {value!r}")
        return value.upper()

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> Any:
        """A JSON list or a comma-separated string (`https://a.example,https://b.example`)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.fuse_attention and self.quantize is not None:
            raise ValueError(
                f"fuse_attention works on float weights, not with quantize={self.quantize!r}: "
                "choose one"
            )
        if self.quantize is not None and self.device != "cpu":
            raise ValueError(f"quantize={self.quantize!r} runs on the CPU only, not {self.device}")
        if self.max_queue < self.max_batch_images:
            raise ValueError(
                f"max_queue ({self.max_queue}) must be >= max_batch_images "
                f"({self.max_batch_images}): a full /caption/batch request could never be queued"
            )
        return self

    @property
    def max_batch_delay_s(self) -> float:
        return self.max_batch_delay_ms / 1000.0


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings from the environment (tests pass their own to `create_app`)."""
    return Settings()
