"""Request dependencies as `Annotated` aliases: settings, metrics, the models, the API key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .prometheus import Metrics
from .services import CaptionService, VQAService
from .settings import Settings

RETRY_AFTER_S = 5  # a hint for 503s: the queue drains or a model finishes loading


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def app_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(app_settings)]
MetricsDep = Annotated[Metrics, Depends(app_metrics)]


def unavailable(name: str, status: str) -> HTTPException:
    if status == "disabled":
        reason = f"the {name} model is disabled in the settings"
    elif status == "loading":
        reason = f"the {name} model is still loading"
    else:
        reason = f"the {name} model is not available ({status})"
    return HTTPException(503, reason, headers={"Retry-After": str(RETRY_AFTER_S)})


def _service(request: Request, name: str):
    """The loaded model's service; 503 + Retry-After when it is not loaded or its queue is full.
    The queue is checked here, before the route decodes the upload, so that an overloaded
    service refuses at once instead of spending a decode (and a worker thread) on each refusal."""
    service = request.app.state.services.get(name)
    if service is None:
        raise unavailable(name, request.app.state.model_status.get(name, "loading"))
    service.batcher.check_room()  # QueueFullError: 503 + Retry-After (api/errors.py)
    return service


def caption_service(request: Request) -> CaptionService:
    return _service(request, CaptionService.name)


def vqa_service(request: Request) -> VQAService:
    return _service(request, VQAService.name)


CaptionerDep = Annotated[CaptionService, Depends(caption_service)]
VQADep = Annotated[VQAService, Depends(vqa_service)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`")


def require_api_key(
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_header)],
) -> None:
    """When an API key is configured, accept it as a Bearer token or an X-API-Key header."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode("utf-8")
    supplied = [k for k in (bearer.credentials if bearer else None, header_key) if k]
    if not supplied:
        detail = "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    elif any(secrets.compare_digest(k.encode("utf-8"), expected) for k in supplied):
        return
    else:
        detail = "wrong API key"
    raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


ApiKeyDep = Depends(require_api_key)
