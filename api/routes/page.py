"""`GET /`: the web page (its files live in `api/static`, served under `/static`), and its icon."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/favicon.ico")
async def favicon() -> FileResponse:
    """Browsers ask for it on any page without an icon link (`/docs`, `/openapi.json`, ...)."""
    return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")
