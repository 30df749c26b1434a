"""The app factory: `create_app(settings) -> FastAPI`.

    app = create_app(Settings(caption_model="models/shapes-captioner", vqa_model=None))

Models load in `lifespan`, onto `app.state.services`. A model folder that fails to load is logged
and reported by `/ready` (503 with the reason) while the process keeps serving `/health`; its
routes answer 503 too. Nothing loads at import time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from captioner import __version__

from . import errors
from .deps import RETRY_AFTER_S
from .draining import Drain, DrainMiddleware
from .linger import LingerMiddleware
from .logs import RequestLogMiddleware
from .model_process import CaptionerProcess
from .prometheus import Metrics
from .routes import caption, docs, health, page, samples, vqa
from .routes.page import STATIC_DIR
from .services import CaptionService, VQAService
from .settings import Settings, get_settings
from .uploads import FORM_OVERHEAD, BodyLimitMiddleware

logger = logging.getLogger("captioner.api")


def _load_captioner(path: Path, settings: Settings) -> Any:
    from captioner.caption.captioner import Captioner

    options = dict(
        device=settings.device, quantize=settings.quantize, fuse_attention=settings.fuse_attention
    )
    if settings.model_process:
        return CaptionerProcess.start(path, max_rows=settings.max_batch_size, **options)
    return Captioner.load(path, **options)


def _load_vqa(path: Path, settings: Settings) -> Any:
    from captioner.vqa.answerer import Answerer

    return Answerer.load(
        path,
        device=settings.device,
        cache_size=settings.feature_cache_items,
        quantize=settings.quantize,
    )


def _models(settings: Settings) -> dict[str, tuple[Path | None, Callable, type]]:
    return {
        CaptionService.name: (settings.caption_model, _load_captioner, CaptionService),
        VQAService.name: (settings.vqa_model, _load_vqa, VQAService),
    }


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    app.state.services = {}
    for name, (path, load, service_class) in _models(settings).items():
        if path is None:
            app.state.model_status[name] = "disabled"
            continue
        app.state.model_status[name] = "loading"
        started = time.perf_counter()
        try:
            model = await run_in_threadpool(load, path, settings)
            service = service_class(model, settings, metrics)
            await service.batcher.start()
        except Exception as exc:  # any failure leaves this model out; /ready says why
            app.state.model_status[name] = f"failed to load {path}: {exc}"
            metrics.model_loaded.labels(name).set(0)
            logger.error(
                "model failed to load",
                extra={"fields": {"model": name, "path": str(path), "error": str(exc)}},
            )
            continue
        seconds = time.perf_counter() - started
        app.state.services[name] = service
        app.state.model_status[name] = "loaded"
        metrics.model_loaded.labels(name).set(1)
        metrics.model_load_seconds.labels(name).set(seconds)
        logger.info(
            "model loaded",
            extra={"fields": {"model": name, "path": str(path), "seconds": round(seconds, 3)}},
        )
    try:
        yield
    finally:
        for service in app.state.services.values():
            await service.close()
        app.state.services = {}


def body_limits(settings: Settings) -> Callable[[str], int]:
    """Largest request body per path: the upload cap plus room for the multipart framing."""
    single = settings.max_upload_bytes + FORM_OVERHEAD
    limits = {
        "/caption": single,
        "/caption/stream": single,
        "/vqa": single,
        "/caption/batch": settings.max_batch_images * single,
    }
    return lambda path: limits.get(path, FORM_OVERHEAD)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPIOffline(  # /docs from local assets, not a CDN; /redoc is routes/docs.py
        title="captioner",
        version=__version__,
        summary="Image captioning (Show, Attend and Tell) and visual question answering",
        lifespan=lifespan,
        redoc_url=None,
        static_url=docs.DOCS_STATIC,
        favicon_url=docs.FAVICON,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.services = {}
    app.state.model_status = {
        name: "loading" if path is not None else "disabled"
        for name, (path, _, _) in _models(settings).items()
    }
    errors.install(app)
    routers = (health.router, caption.router, vqa.router, samples.router, page.router, docs.router)
    for router in routers:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    app.add_middleware(BodyLimitMiddleware, limit_for=body_limits(settings))
    app.state.drain = Drain()  # api/graceful.py begins it on SIGTERM / SIGINT
    app.add_middleware(DrainMiddleware, drain=app.state.drain, retry_after_s=RETRY_AFTER_S)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestLogMiddleware, metrics=app.state.metrics)  # sees every request
    # Outermost: early answers (413, 503) reach clients that send the whole body first.
    app.add_middleware(
        LingerMiddleware, max_bytes=settings.linger_max_bytes, max_seconds=settings.linger_s
    )
    return app
