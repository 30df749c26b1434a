"""`GET /samples/scene` and `GET /samples/scene.png`: generated shapes-world scenes for the web page.

A scene is fully determined by its seed (`captioner.data.shapes.make_scene`), so the page can offer
"a random sample scene" together with the scene's reference captions and questions, which the
demo models were trained on. No model is involved: these routes stay open when an API key is set.
"""

from __future__ import annotations

import io
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from captioner.data.shapes import make_scene, render

from ..schemas import ERRORS

router = APIRouter(prefix="/samples", tags=["samples"], responses={422: ERRORS[422]})

MAX_SEED = 2**31 - 1
DEFAULT_SIZE = 128  # the demo models were trained on 128 x 128 scenes

Seed = Annotated[int, Query(ge=0, le=MAX_SEED, description="the scene is fully set by its seed")]
Size = Annotated[int, Query(ge=32, le=512, description="side of the square image, in pixels")]


class SampleQuestion(BaseModel):
    question: str
    answer: str
    type: str


class SampleScene(BaseModel):
    seed: int
    size: int
    image_url: str
    captions: list[str]
    questions: list[SampleQuestion]


def scene_png(seed: int, size: int) -> bytes:
    """The scene's picture as PNG bytes (CPU work: call it in a worker thread)."""
    buf = io.BytesIO()
    render(make_scene(seed, size=size)).save(buf, "PNG")
    return buf.getvalue()


@router.get("/scene", response_model=SampleScene, summary="A generated scene and its references")
async def scene(seed: Seed, size: Size = DEFAULT_SIZE) -> dict[str, Any]:
    found = await run_in_threadpool(make_scene, seed, 1, size)
    return {
        "seed": seed,
        "size": size,
        "image_url": f"/samples/scene.png?seed={seed}&size={size}",
        "captions": list(found.captions),
        "questions": [
            {"question": q.question, "answer": q.answer, "type": q.question_type}
            for q in found.questions
        ],
    }


@router.get(
    "/scene.png",
    response_class=Response,
    summary="A generated scene's picture (PNG)",
    responses={200: {"content": {"image/png": {}}}},
)
async def scene_image(seed: Seed, size: Size = DEFAULT_SIZE) -> Response:
    data = await run_in_threadpool(scene_png, seed, size)
    return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=86400"})
