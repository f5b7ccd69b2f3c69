"""POST /v1/admin/reload: swap in new model versions from the repository (SIGHUP does the same)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from ..deps import State, require_admin_key
from ..schemas import ModelName, ReloadOutcome, ReloadResponse

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin_key)])


@router.post("/reload", response_model=ReloadResponse, summary="Reload one model, or rescan the repository")
async def reload(state: State, model: ModelName | None = Query(None, description="one model; default: rescan all")) -> ReloadResponse:
    """A model whose new version fails to load keeps serving its old version (`reloaded: false`, with
    the reason); requests in flight finish on the version they started on."""
    outcomes = await state.repo.reload(model)  # UnknownModel: 404; ModelNotReady (a split server's inference process away): 503
    results = [ReloadOutcome(**o) for o in outcomes]
    return ReloadResponse(ok=all(r.reloaded for r in results), results=results)
