"""`serve(...)`: run the service with uvicorn (what `captioner serve` and `make serve` call), shut
down gracefully on SIGTERM or SIGINT within `CAPTIONER_SHUTDOWN_GRACE_S` (api/graceful.py)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

from .logs import configure_logging

logger = logging.getLogger("captioner.api")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    caption_model: str | Path | None = None,
    vqa_model: str | Path | None = None,
    **overrides: Any,
) -> None:
    """Serve on `host:port` until SIGTERM or SIGINT, then shut down gracefully and end the
    process, with status 0 (api/graceful.py).

    `caption_model` / `vqa_model`: model folders; None keeps the setting from `CAPTIONER_*`
    variables (else the demo model), "" disables that model. Further keyword arguments override
    other `Settings` fields (e.g. `device="cuda"`, `max_batch_size=32`).
    """
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from .app import create_app
    from .graceful import GracefulServer
    from .settings import Settings

    if caption_model is not None:
        overrides["caption_model"] = caption_model
    if vqa_model is not None:
        overrides["vqa_model"] = vqa_model
    settings = Settings(**overrides)
    configure_logging(settings.log_level)
    if settings.api_key is None and not _is_loopback(host):
        logger.warning(
            "serving on %s without an API key: anyone who can reach it can use it "
            "(set CAPTIONER_API_KEY)",
            host,
        )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http="h11",  # the protocol whose connection states GracefulServer reads
        ws="none",
        log_level=settings.log_level.lower(),
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        access_log=False,  # RequestLogMiddleware writes one JSON line per request instead
    )
    server = GracefulServer(config, drain=app.state.drain, grace_s=settings.shutdown_grace_s)
    server.run()  # on SIGTERM or SIGINT, the process ends in there once shut down
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)  # as uvicorn.run does; the reason is in the log
