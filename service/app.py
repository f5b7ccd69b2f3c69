"""The FastAPI application: `create_app(settings)`. Nothing starts at import; models load in lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import signal
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from PIL import Image

from . import problems
from .deps import ServiceState
from .metrics import Metrics
from .middleware import BodyLimit, RequestContext
from .repository import Loader, ModelRepository, Repository
from .routes import ROUTERS, docs, playground
from .settings import Settings

log = logging.getLogger("vqtok.service")


RepositoryFactory = Callable[[Settings, Metrics], Repository]


def create_app(settings: Settings | None = None, *, loader: Loader | None = None, repository: RepositoryFactory | None = None) -> FastAPI:
    """`loader` replaces `models.runtime.load_runtime` (tests wrap the real runtime to inject faults).
    `repository` builds the models this app answers for, in its lifespan: by default a `ModelRepository`
    that runs them in this process; a front of the multi-process server passes its own
    (`service.multiproc.front.remote_repository`)."""
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Pillow's own bomb guard, as a second line behind the header check in models/core/pixels.py.
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        pool = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="images")
        repo = repository(settings, metrics) if repository is not None else ModelRepository(settings, metrics, loader)
        state = app.state.vqtok = ServiceState(settings, metrics, repo, pool)
        # Load in the background: /healthz answers at once, /readyz turns 200 once models are warm.
        loading = asyncio.create_task(repo.load_all(), name="load-models")
        _on_sighup(lambda: asyncio.create_task(repo.reload(), name="sighup-reload"))
        log.info("service starting", extra={"model_repo": str(settings.model_repo), "device": settings.device})
        try:
            yield
        finally:
            state.draining = True
            if not loading.done():
                loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await repo.close()
            pool.shutdown(wait=False, cancel_futures=True)
            _on_sighup(None)
            log.info("service stopped")

    app = FastAPI(
        **_telemetry(settings),
        title="vqtok",
        summary="Image tokenizer service: images to discrete token ids and back.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from routes.docs, on assets served here (no CDN)
        redoc_url=None,
    )
    problems.install(app, settings.retry_after_s)
    for router in ROUTERS:
        app.include_router(router)
    docs.install(app)
    app.include_router(playground.router)
    # Outermost first: the request id exists before anything can fail, the body limit wraps every read.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, metrics=metrics)
    return app


def _telemetry(settings: Settings) -> dict[str, Any]:
    """FastAPI's `telemetry` argument where this FastAPI has native OpenTelemetry (0.165 on): off unless
    `settings.opentelemetry`. (The Prometheus metrics at /metrics are this service's own, either way.)"""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    on = settings.opentelemetry
    return {"telemetry": {"tracing": on, "metrics": on, "logs": on, "operation_spans": on}}


def uvicorn_config(app: FastAPI, settings: Settings) -> Any:
    """The uvicorn.Config every server process runs its app with (single-process and split fronts)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
    )


def _on_sighup(callback: object) -> None:
    """SIGHUP reloads the repository (main thread only: a server run in a test thread has no signals)."""
    try:
        loop = asyncio.get_running_loop()
        if callback is None:
            loop.remove_signal_handler(signal.SIGHUP)
        else:
            loop.add_signal_handler(signal.SIGHUP, callback)  # type: ignore[arg-type]
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        pass
