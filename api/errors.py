"""Every error is JSON `{"detail": str}`: HTTP errors, validation errors, and the unexpected."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import BatcherClosedError, QueueFullError

logger = logging.getLogger("captioner.api")

_LOCATIONS = {"query", "body", "path", "header", "cookie", "form"}


def validation_detail(errors: list[dict[str, Any]]) -> str:
    """FastAPI's error list as one readable line: `beam_size: Input should be ...; image: ...`."""
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p not in _LOCATIONS]
        msg = str(error.get("msg", "invalid value"))
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": validation_detail(list(exc.errors()))}, status_code=422)


BUSY = (QueueFullError, BatcherClosedError)  # answered 503 + Retry-After
INTERNAL = "internal server error"  # the detail of a 500: nothing about the code leaks


def busy_detail(exc: Exception) -> str:
    return f"{exc}; retry later"


async def _busy(request: Request, exc: Exception) -> JSONResponse:
    from .deps import RETRY_AFTER_S

    return JSONResponse(
        {"detail": busy_detail(exc)},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": INTERNAL}, status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for busy in BUSY:
        app.add_exception_handler(busy, _busy)
    app.add_exception_handler(Exception, _unexpected)
