"""`GET /health`, `/ready` (open), `/metrics`, `/models` and `/models/{name}/card` (behind the API
key when one is set)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import ApiKeyDep, MetricsDep
from ..schemas import (
    ERRORS,
    ErrorResponse,
    HealthResponse,
    ModelCardResponse,
    ModelsResponse,
    ReadyResponse,
)

router = APIRouter(tags=["service"])


@router.get("/health", response_model=HealthResponse, summary="The process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=ReadyResponse,
    summary="200 once every configured model is loaded, else 503",
    responses={503: {"model": ErrorResponse, "description": "a model is loading or failed"}},
)
async def ready(request: Request) -> Any:
    status: dict[str, str] = dict(request.app.state.model_status)
    configured = {name: s for name, s in status.items() if s != "disabled"}
    if not configured:
        return JSONResponse({"detail": "no model is configured"}, status_code=503)
    waiting = {name: s for name, s in configured.items() if s != "loaded"}
    if waiting:
        reasons = "; ".join(f"{name}: {s}" for name, s in waiting.items())
        return JSONResponse({"detail": f"not ready: {reasons}"}, status_code=503)
    return {"status": "ready", "models": status}


@router.get(
    "/metrics",
    dependencies=[ApiKeyDep],
    summary="Prometheus metrics (text format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: ERRORS[401]},
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/models",
    dependencies=[ApiKeyDep],
    response_model=ModelsResponse,
    response_model_exclude_unset=True,
    summary="Metadata of each loaded model",
    responses={401: ERRORS[401]},
)
async def models(request: Request) -> dict[str, Any]:
    return {"models": [s.metadata() for s in request.app.state.services.values()]}


@router.get(
    "/models/{name}/card",
    dependencies=[ApiKeyDep],
    response_model=ModelCardResponse,
    summary="The card of a loaded model: its domain, data, figures, intended use and limits",
    responses={401: ERRORS[401], 404: {"model": ErrorResponse, "description": "no such model"}},
)
async def model_card(name: str, request: Request) -> dict[str, Any]:
    loaded = [s.metadata() for s in request.app.state.services.values()]
    for meta in loaded:
        if meta["name"] == name:
            return meta["card"]
    names = ", ".join(repr(m["name"]) for m in loaded) or "none"
    raise HTTPException(404, f"no loaded model is named {name!r}; loaded: {names}")
