"""GET /v1/models, GET /v1/models/{name}: what is loaded, and the limits a client should split to."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from models.core.layouts import grid_side_limit

from ..deps import ServiceState, State, require_api_key
from ..repository import ModelEntry
from ..schemas import Limits, ModelList, ModelName, ModelOut

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


def model_out(entry: ModelEntry, state: ServiceState) -> ModelOut:
    s = state.settings
    out = ModelOut(name=entry.name, state=entry.state, ready=entry.state == "ready", error=entry.error, default_resize=s.default_resize)
    served = entry.served
    if served is not None:
        info = served.runtime.info
        f = info.downsample
        out = out.model_copy(
            update=dict(
                codebook_size=info.codebook_size,
                downsample=f,
                resolution=info.resolution,
                grid_rule=f"grid = (H/{f}, W/{f}) of the model input: resize=crop makes it {info.resolution}×{info.resolution}, "
                f"pad rounds H and W up to multiples of {f}, none needs them; a request that names none gets {s.default_resize}",
                layout_max_grid=grid_side_limit(s.max_grid_tokens, s.max_image_pixels, f),
                quantizer=info.quantizer,
                precision=info.precision,
                opset=info.opset,
                revision=info.revision,
                exported_from=info.exported_from,
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
        default_resize=s.default_resize,
    )


@router.get("/models", response_model=ModelList, summary="Models in the repository")
async def list_models(state: State) -> ModelList:
    await state.repo.refresh()
    return ModelList(
        default_model=state.repo.default_name, models=[model_out(e, state) for e in state.repo.entries()], limits=limits(state)
    )


@router.get("/models/{name}", response_model=ModelOut, summary="One model")
async def get_model(name: ModelName, state: State) -> ModelOut:
    await state.repo.refresh()
    return model_out(state.repo.entry(name), state)
