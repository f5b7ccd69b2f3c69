"""Request and response bodies. Limits that depend on settings (images per request, grid size) are
enforced in the routes, which answer 413; the body-size limit bounds everything else. The caps here
are the hard ones that no setting changes."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from models.core.layouts import LAYOUTS

from .settings import ResizeMode

LayoutName = Literal["plain", "chameleon", "lumina", "emu3"]
assert get_args(LayoutName) == LAYOUTS
MAX_ID = 2**31 - 1  # every LLM id the service answers fits an int32 (npy answers, the packed .bin's readers)
VocabOffset = Annotated[int, Field(ge=0, le=MAX_ID, description="the LLM id of image code 0 (default 0)")]
MaxGrid = Annotated[
    int,
    Field(
        ge=1,
        le=1 << 20,
        description="largest grid side the layout is built for (lumina: its size tokens; the ids do not depend on it); "
        "default and upper bound: the service's, min(max_grid_tokens, max_image_pixels / f²)",
    ),
]
_LAYOUT_TEXT = (
    "LLM layout: plain, chameleon or lumina (emu3 writes the grid size as text, in a text tokenizer's ids the server does not "
    "have: use the Python API with a Layout built with text_ids, or `vqtok tokenize --layout emu3 --text-tokenizer`)"
)

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
    resize: ResizeMode | None = Field(
        default=None, description="crop | pad | none; default: the server's default_resize (crop unless configured otherwise)"
    )
    layout: LayoutName | None = Field(default=None, description=_LAYOUT_TEXT + "; with it each image also gets its `sequence`")
    vocab_offset: VocabOffset | None = None
    max_grid: MaxGrid | None = None


class EncodedImage(BaseModel):
    tokens: list[list[int]] = Field(description="token ids, h rows of w")
    grid: Grid
    source_size: Size = Field(description="the image's size after EXIF orientation, before resizing")
    sequence: list[int] | None = Field(
        default=None, description="with `layout`: the image's span of LLM ids (image code k is vocab_offset + k, specials after the codes)"
    )


class LayoutOut(BaseModel):
    """The layout a request used, once per answer."""

    name: LayoutName
    vocab_offset: int
    codebook_size: int = Field(description="K: image code k is LLM id vocab_offset + k")
    max_grid: int = Field(description="largest grid side the layout covers")
    image_ids: list[int] = Field(description="[start, stop): the LLM ids of the image codes")
    special_ids: dict[str, int] = Field(
        description="the special tokens' ids by name, at vocab_offset + K + i: boi, eoi (chameleon); boi, eoi, eol, h1, w1 (lumina)"
    )
    resolution_ids: str | None = Field(default=None, description="lumina: the rule giving every size token's id from h1 and w1")


class EncodeResponse(BaseModel):
    model: str
    codebook_size: int
    downsample: int
    layout: LayoutOut | None = Field(default=None, description="with `layout`: the layout the sequences follow")
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


class DecodeSequenceRequest(_Strict):
    sequence: Annotated[list[int], Field(description="an LLM's ids: text and any number of image spans")]
    layout: LayoutName = Field(description=_LAYOUT_TEXT)
    vocab_offset: VocabOffset = 0
    grid: Grid | None = Field(
        default=None,
        description="[h, w]: needed for plain (no delimiters); for chameleon the size of every span (default: square spans); "
        "lumina spans declare their size (checked against it when given)",
    )
    repair: bool = Field(
        default=False,
        description="mend malformed spans (ragged rows padded or cut, missing rows repeated, non-image ids clamped, a missing "
        "eoi supplied) and say what changed in `spans[].changes`; default: a malformed span is a 422 naming span and position",
    )
    max_grid: MaxGrid | None = None
    model: ModelName | None = None


class DecodedSpan(BaseModel):
    start: int = Field(description="position of the span's first id in the sequence")
    end: int = Field(description="one past its last id")
    grid: Grid
    size: Size
    changes: list[str] = Field(default=[], description="what repair changed in this span, in words (empty: well-formed)")


class DecodeSequenceResponse(BaseModel):
    model: str
    layout: LayoutOut
    repaired: bool = Field(description="whether repair changed anything")
    spans: list[DecodedSpan]
    images: list[str] = Field(description="base64 PNG per span, in order")


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
    default_resize: ResizeMode | None = Field(default=None, description="the resize mode of an encode request that names none")
    layout_max_grid: int | None = Field(
        default=None, description="largest grid side of the layouts (sequence answers): min(max_grid_tokens, max_image_pixels / f²)"
    )
    quantizer: str | None = None
    precision: str | None = None
    opset: int | None = None
    revision: str | None = Field(default=None, description="the model's own revision: the first 12 hex digits of its weights' sha256")
    exported_from: str | None = Field(default=None, description="git revision of the vqtok code that exported it")
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
    default_resize: ResizeMode = Field(description="the resize mode of an encode request that names none")


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
