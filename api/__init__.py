"""The FastAPI service: `create_app(settings)`, routes, schemas, micro-batching, the web page.

Importing `api` loads no model (and not even FastAPI): models load when the app starts.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'api' has no attribute {name!r}")
