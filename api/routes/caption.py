"""`POST /caption`, `POST /caption/batch` and `POST /caption/stream`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from captioner.results import AnswerResult, AttentionFormat, CaptionResult

from ..deps import ApiKeyDep, CaptionerDep, MetricsDep, SettingsDep
from ..errors import BUSY, INTERNAL, busy_detail
from ..prometheus import Metrics
from ..schemas import ERRORS, STREAM_RESPONSE, CaptionBatchResponse, CaptionResponse
from ..streaming import CaptionStream, sse, word_events
from ..uploads import decoded_upload, timeout_detail, with_timeout

logger = logging.getLogger("captioner.api")

router = APIRouter(tags=["caption"], dependencies=[ApiKeyDep], responses=ERRORS)

BeamSize = Annotated[int, Query(ge=1, le=10, description="beam width; 1 is greedy decoding")]
MaxLength = Annotated[int, Query(ge=1, le=50, description="longest caption, in words")]
AttentionQuery = Annotated[
    AttentionFormat,
    Query(description="none; grid: [T][h][w] weights; png: T base64 heatmaps over the image"),
]

# Attention values rounded and listed on the event loop itself: 16k take about 0.3 ms, less than
# the hop to a worker thread and back that larger grids and PNG overlays (tens of ms) are worth.
INLINE_ATTENTION_VALUES = 16_384


async def response_bodies(
    results: Sequence[CaptionResult | AnswerResult],
    attention: AttentionFormat,
    images: Sequence[Image.Image],
) -> list[dict[str, Any]]:
    """Each result's `to_dict(attention, image)`: PNG overlays and large grids in a worker thread,
    so that they never block the event loop; small grids and `none` right here."""

    def bodies() -> list[dict[str, Any]]:
        return [r.to_dict(attention, im) for r, im in zip(results, images, strict=True)]

    values = sum(0 if r.attention is None else r.attention.size for r in results)
    if attention is AttentionFormat.png or values > INLINE_ATTENTION_VALUES:
        return await run_in_threadpool(bodies)
    return bodies()


@router.post("/caption", response_model=CaptionResponse, summary="Caption one image")
async def caption(
    request: Request,
    service: CaptionerDep,
    settings: SettingsDep,
    image: Annotated[UploadFile, File(description="the image (JPEG, PNG, GIF, WebP, ...)")],
    beam_size: BeamSize = 3,
    max_length: MaxLength = 20,
    attention: AttentionQuery = AttentionFormat.grid,
) -> dict[str, Any]:
    async def work() -> dict[str, Any]:
        decoded = await decoded_upload(
            image, settings.max_upload_bytes, settings.max_pixels, service.input_size
        )
        [(result, batch_size)] = await service.caption([decoded.pixels], beam_size, max_length)
        request.state.log_fields["batch_size"] = batch_size
        [body] = await response_bodies([result], attention, [decoded.image])
        return body

    return await with_timeout(work(), settings.request_timeout_s)


@router.post(
    "/caption/batch", response_model=CaptionBatchResponse, summary="Caption several images"
)
async def caption_batch(
    request: Request,
    service: CaptionerDep,
    settings: SettingsDep,
    image: Annotated[
        list[UploadFile], File(min_length=1, description="repeat the field once per image")
    ],
    beam_size: BeamSize = 3,
    max_length: MaxLength = 20,
    attention: AttentionQuery = AttentionFormat.grid,
) -> dict[str, Any]:
    if len(image) > settings.max_batch_images:
        raise HTTPException(
            413, f"{len(image)} images; a batch request takes at most {settings.max_batch_images}"
        )

    async def work() -> dict[str, Any]:
        decoded = []
        for index, upload in enumerate(image):
            label = f"image at index {index} ({upload.filename!r})"
            decoded.append(
                await decoded_upload(
                    upload,
                    settings.max_upload_bytes,
                    settings.max_pixels,
                    service.input_size,
                    label,
                )
            )
        outcomes = await service.caption([d.pixels for d in decoded], beam_size, max_length)
        request.state.log_fields.update(
            images=len(decoded), batch_size=max(size for _, size in outcomes)
        )
        results = [result for result, _ in outcomes]
        return {"results": await response_bodies(results, attention, [d.image for d in decoded])}

    return await with_timeout(work(), settings.request_timeout_s)


@router.post(
    "/caption/stream",
    response_class=StreamingResponse,
    responses=STREAM_RESPONSE,
    summary="Caption one image, word by word (server-sent events)",
)
async def caption_stream(
    request: Request,
    service: CaptionerDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    image: Annotated[UploadFile, File(description="the image (JPEG, PNG, GIF, WebP, ...)")],
    beam_size: BeamSize = 3,
    max_length: MaxLength = 20,
    attention: AttentionQuery = AttentionFormat.grid,
) -> StreamingResponse:
    """As `POST /caption`, answered as `text/event-stream`: a `word` event for each word as soon
    as the search has fixed it (beam size 1: every step; wider beams: once every live beam, and
    the best caption already ended unless it scores below them all, agree on it), then a `result`
    event with exactly what `POST /caption` returns. The words' tokens, log-probs and attention
    are the result's. Errors before the first event have `POST /caption`'s status codes; after
    it, an `error` event `{"detail", "status"}` ends the stream. A client that disconnects stops
    the search for its image."""
    loop = asyncio.get_running_loop()
    limit = settings.request_timeout_s
    deadline = loop.time() + limit
    decoded = await with_timeout(
        decoded_upload(image, settings.max_upload_bytes, settings.max_pixels, service.input_size),
        limit,
    )
    stream = CaptionStream(loop)
    stream.follow(
        asyncio.ensure_future(
            service.caption_streamed(decoded.pixels, beam_size, max_length, stream)
        )
    )
    try:
        first = await with_timeout(stream.next(), deadline - loop.time(), limit)
    except BaseException:
        stream.stop()
        raise
    events = _events(request, stream, first, attention, decoded.image, deadline, limit, metrics)
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    request: Request,
    stream: CaptionStream,
    item: Any,
    attention: AttentionFormat,
    image: Image.Image,
    deadline: float,
    limit: float,
    metrics: Metrics,
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    outcome = "disconnected"  # what ends the stream unless it gets to the end
    try:
        while not isinstance(item, tuple):
            if attention is AttentionFormat.png:  # PNG encoding: off the event loop
                yield await run_in_threadpool(word_events, item, attention, image)
            else:
                yield word_events(item, attention, image)
            try:
                item = await asyncio.wait_for(stream.next(), deadline - loop.time())
            except asyncio.TimeoutError:
                outcome = "timeout"
                yield sse("error", {"detail": timeout_detail(limit), "status": 504})
                return
            except BUSY as exc:  # as the app's error handlers answer them (api/errors.py)
                outcome = "error"
                yield sse("error", {"detail": busy_detail(exc), "status": 503})
                return
            except Exception:
                outcome = "error"
                logger.exception("streamed caption failed after its first word")
                yield sse("error", {"detail": INTERNAL, "status": 500})
                return
        result, batch_size = item
        request.state.log_fields["batch_size"] = batch_size
        [body] = await response_bodies([result], attention, [image])
        yield sse("result", body)
        outcome = "completed"
    finally:
        stream.stop()  # the client left (or the stream ended): the search drops the image
        metrics.streams.labels(outcome).inc()
