"""Request and response bodies. Limits that depend on settings (images per request, grid size) are
enforced in the routes, which answer 413; the body-size limit bounds everything else. The caps here
are the hard ones that no setting changes."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from .settings import ResizeMode

ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._\-]+$")]
Grid = Annotated[list[Annotated[int, Field(ge=1, le=4096)]], Field(min_length=2, max_length=2, description="[h, w]")]
Size = Annotated[list[int], Field(min_length=2, max_length=2, description="[height, width] in pixels")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- encode ---


class EncodeJSONRequest(_Strict):
    images: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="base64 image files (PNG, JPEG, WebP, BMP); a data: URL prefix is allowed"
    )
    model: ModelName | None = Field(default=None, description="model name; default: the server's default model")
    resize: ResizeMode | None = Field(default=None, description="none | crop | pad; default: the server's default (none)")


class EncodedImage(BaseModel):
    tokens: list[list[int]] = Field(description="token ids, h rows of w")
    grid: Grid
    source_size: Size = Field(description="the image's size after EXIF orientation, before resizing")


class EncodeResponse(BaseModel):
    model: str
    codebook_size: int
    downsample: int
    images: list[EncodedImage]


# --- decode ---

# Validated by the route through numpy (one pass, and a clear message for floats, bools or ragged
# rows); the schema documents the intended shape.
_ID_ROWS = {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}}
Tokens = Annotated[list[Any], Field(min_length=1), WithJsonSchema({"anyOf": [_ID_ROWS, {"type": "array", "items": _ID_ROWS}]})]


class DecodeJSONRequest(_Strict):
    tokens: Tokens = Field(description="one h×w grid of ids, or a batch of same-size grids (B×h×w)")
    model: ModelName | None = None
    grid: Grid | None = Field(default=None, description="optional [h, w]: when given it must match the shape of tokens")


class DecodeResponse(BaseModel):
    model: str
    grid: Grid
    size: Size
    images: list[str] = Field(description="base64 PNG per grid, in order")


# --- models, health, admin ---


class ModelOut(BaseModel):
    name: str
    state: str = Field(description="loading | ready | failed")
    ready: bool
    error: str | None = None
    codebook_size: int | None = None
    downsample: int | None = None
    resolution: int | None = Field(default=None, description="native size; resize=crop makes resolution×resolution inputs")
    grid_rule: str | None = None
    quantizer: str | None = None
    precision: str | None = None
    opset: int | None = None
    revision: str | None = None
    manifest_sha256: str | None = None
    device: str | None = Field(default=None, description="cuda | cpu: where this model runs")
    runtime: str | None = Field(default=None, description="the runtime serving it, with its version (e.g. onnxruntime 1.23.2)")
    providers: list[str] = []
    batch_workers: int | None = Field(default=None, description="batches this model runs at the same time")
    queue_depth: int = 0
    loaded_at: float | None = Field(default=None, description="unix time the serving version was loaded")
    source: dict[str, Any] | None = Field(
        default=None,
        description="an imported model's provenance (config.json's source: format, id, subfolder, commit, licence); null for vqtok's own",
    )


class Limits(BaseModel):
    max_body_bytes: int
    max_images_per_request: int
    max_image_pixels: int
    max_grid_tokens: int
    max_batch_size: int
    request_timeout_s: float


class ModelList(BaseModel):
    default_model: str | None
    models: list[ModelOut]
    limits: Limits


class Health(BaseModel):
    status: str
    models: dict[str, str] = {}


class ReloadOutcome(BaseModel):
    model: str
    reloaded: bool
    state: str
    error: str | None = None


class ReloadResponse(BaseModel):
    ok: bool
    results: list[ReloadOutcome]
