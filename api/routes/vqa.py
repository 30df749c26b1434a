"""`POST /vqa`: answer a question about an image."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from pydantic import AfterValidator

from captioner.results import AttentionFormat
from captioner.vocab import tokenize

from ..deps import ApiKeyDep, SettingsDep, VQADep
from ..schemas import ERRORS, VQAResponse
from ..uploads import decoded_upload, with_timeout
from .caption import AttentionQuery, response_bodies

router = APIRouter(tags=["vqa"], dependencies=[ApiKeyDep], responses=ERRORS)


def _has_words(question: str) -> str:
    if not tokenize(question):
        raise ValueError("the question is empty (only whitespace)")
    return question.strip()


Question = Annotated[
    str,
    Form(min_length=1, max_length=200, description="e.g. 'what color is the circle?'"),
    AfterValidator(_has_words),
]
TopK = Annotated[int, Query(ge=1, le=10, description="how many answers to list")]


@router.post("/vqa", response_model=VQAResponse, summary="Answer a question about an image")
async def vqa(
    request: Request,
    service: VQADep,
    settings: SettingsDep,
    image: Annotated[UploadFile, File(description="the image (JPEG, PNG, GIF, WebP, ...)")],
    question: Question,
    top_k: TopK = 3,
    attention: AttentionQuery = AttentionFormat.grid,
) -> dict[str, Any]:
    async def work() -> dict[str, Any]:
        decoded = await decoded_upload(
            image, settings.max_upload_bytes, settings.max_pixels, service.input_size
        )
        result, batch_size = await service.answer(decoded.data, decoded.pixels, question, top_k)
        request.state.log_fields["batch_size"] = batch_size
        [body] = await response_bodies([result], attention, [decoded.image])
        return body

    return await with_timeout(work(), settings.request_timeout_s)
