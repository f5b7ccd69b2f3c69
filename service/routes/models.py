"""GET /v1/models, GET /v1/models/{name}: what is loaded, and the limits a client should split to."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..deps import ServiceState, State, require_api_key
from ..repository import ModelEntry
from ..schemas import Limits, ModelList, ModelName, ModelOut

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


def model_out(entry: ModelEntry) -> ModelOut:
    out = ModelOut(name=entry.name, state=entry.state, ready=entry.state == "ready", error=entry.error)
    served = entry.served
    if served is not None:
        info = served.runtime.info
        f = info.downsample
        out = out.model_copy(
            update=dict(
                codebook_size=info.codebook_size,
                downsample=f,
                resolution=info.resolution,
                grid_rule=f"grid = (H/{f}, W/{f}); resize=none needs H and W multiples of {f}, pad rounds them up, crop makes {info.resolution}×{info.resolution}",
                quantizer=info.quantizer,
                precision=info.precision,
                opset=info.opset,
                revision=info.revision,
                manifest_sha256=info.manifest_sha256,
                device=served.runtime.device,
                runtime=served.runtime.runtime_name,
                providers=list(served.runtime.providers),
                batch_workers=served.batcher.workers,
                queue_depth=served.batcher.queued_images,
                loaded_at=served.loaded_at,
                source=getattr(info, "source", None),
            )
        )
    return out


def limits(state: ServiceState) -> Limits:
    s = state.settings
    return Limits(
        max_body_bytes=s.max_body_bytes,
        max_images_per_request=s.max_images_per_request,
        max_image_pixels=s.max_image_pixels,
        max_grid_tokens=s.max_grid_tokens,
        max_batch_size=s.max_batch_size,
        request_timeout_s=s.request_timeout_s,
    )


@router.get("/models", response_model=ModelList, summary="Models in the repository")
async def list_models(state: State) -> ModelList:
    await state.repo.refresh()
    return ModelList(default_model=state.repo.default_name, models=[model_out(e) for e in state.repo.entries()], limits=limits(state))


@router.get("/models/{name}", response_model=ModelOut, summary="One model")
async def get_model(name: ModelName, state: State) -> ModelOut:
    await state.repo.refresh()
    return model_out(state.repo.entry(name))
