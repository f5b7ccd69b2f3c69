"""Liveness, readiness and metrics: open even when API keys are configured."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import State
from ..problems import NotReady
from ..schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, summary="Readiness: models loaded and warmed", responses={503: {"description": "not ready"}})
async def readyz(state: State) -> Health:
    models = {e.name: e.state for e in state.repo.entries()}
    why = "draining for shutdown" if state.draining else state.repo.not_ready_reason()
    if why is not None:
        raise NotReady(why, models=models)  # Retry-After: the server's retry_after_s setting
    return Health(status="ready", models=models)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(state: State) -> Response:
    return Response(await state.repo.exposition(), media_type=CONTENT_TYPE_LATEST)
