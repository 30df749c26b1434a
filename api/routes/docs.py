"""`GET /redoc`: ReDoc from the fastapi-offline wheel, as fastapi-offline serves it, plus a header.

Swagger UI (`/docs`) and ReDoc's script come from that wheel, served under `DOCS_STATIC`, so both
pages work offline. ReDoc 2 also shows Redocly's logo, fetched from cdn.redoc.ly whatever its
options say: offline the image hides itself, online the request tells Redocly who reads these
docs. The Content-Security-Policy keeps the browser from sending it. Like `/openapi.json`, the docs
need no API key; Swagger UI's "Authorize" takes one for the requests it sends.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse

DOCS_STATIC = "/static-offline-docs"  # where create_app mounts fastapi-offline's assets
FAVICON = "favicon.ico"  # relative to /docs and /redoc: /favicon.ico, under a root_path too

router = APIRouter(include_in_schema=False)


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    response = get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
        redoc_favicon_url=FAVICON,
        with_google_fonts=False,
    )
    response.headers["Content-Security-Policy"] = "img-src 'self' data:"
    return response
