"""Uploaded files to model inputs: bounded reads, safe decoding, and the HTTP errors for bad images.

Two guards keep an upload from costing more than its cap: `BodyLimitMiddleware` refuses a request
body over its route's limit (from Content-Length before anything is read, or as the bytes arrive),
and `read_upload` reads each file in chunks and stops one chunk past `max_bytes`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from fastapi import HTTPException, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from captioner.image import ImageError, ImageTooLargeError, load_image, preprocess

CHUNK = 256 * 1024
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and a question field
T = TypeVar("T")


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, EXIF-rotated: what attention overlays are drawn on
    pixels: torch.Tensor  # (3, S, S), preprocessed exactly as in training
    data: bytes  # the uploaded bytes (what the VQA feature cache keys an image by)


async def read_upload(upload: UploadFile, max_bytes: int, label: str = "image") -> bytes:
    """The file's bytes, refusing (413) anything over `max_bytes` without reading it all."""
    if upload.size is not None and upload.size > max_bytes:
        raise HTTPException(413, f"{label} is {upload.size} bytes; the limit is {max_bytes}")
    chunks, total = [], 0
    while chunk := await upload.read(CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise HTTPException(413, f"{label} is over the upload limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_image(data: bytes, max_pixels: int, input_size: int) -> DecodedImage:
    """Decode and preprocess one upload (CPU work: call it in a worker thread)."""
    image = load_image(data, max_pixels)
    return DecodedImage(image, preprocess(image, input_size), data)


def image_error(exc: ImageError, label: str = "image") -> HTTPException:
    """413 for an image over the pixel cap, 415 for anything that is not a decodable image."""
    status = 413 if isinstance(exc, ImageTooLargeError) else 415
    return HTTPException(status, f"{label}: {exc}")


class BodyLimitMiddleware:
    """Refuse request bodies over `limit_for(path)` bytes with 413, before reading them."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = Headers(scope=scope).get("content-length", "")
        too_large = HTTPException(413, f"request body is over the limit of {limit} bytes")
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > limit:
                raise too_large  # FastAPI re-raises HTTPExceptions from body parsing as they are
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


async def decoded_upload(
    upload: UploadFile, max_bytes: int, max_pixels: int, input_size: int, label: str = "image"
) -> DecodedImage:
    """Read (bounded), decode and preprocess an upload off the event loop; 413/415 on bad input."""
    data = await read_upload(upload, max_bytes, label)
    try:
        return await run_in_threadpool(decode_image, data, max_pixels, input_size)
    except ImageError as exc:
        raise image_error(exc, label) from None


def timeout_detail(limit_s: float) -> str:
    return f"the request took longer than its {limit_s:g} s limit"


async def with_timeout(work: Awaitable[T], seconds: float, limit_s: float | None = None) -> T:
    """Await `work`, answering 504 when it takes longer than `seconds` (what is left of the
    request's `limit_s`, the limit the answer names; `seconds` by default)."""
    try:
        return await asyncio.wait_for(work, seconds)
    except asyncio.TimeoutError:
        limit = seconds if limit_s is None else limit_s
        raise HTTPException(504, timeout_detail(limit)) from None
