"""Service settings: one validated object, read from `VQTOK_*` environment variables (and the flags of
`vqtok serve`, which override them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.core.artefacts import Device, Precision, pretrained_repo
from models.core.pixels import DEFAULT_RESIZE, SERVICE_MAX_GRID_TOKENS, SERVICE_MAX_IMAGE_PIXELS, ResizeMode

# How `vqtok serve --help` groups the flags: each group from its first setting up to the next group's (the
# fields below are written in that order, under the same headings).
GROUPS = {
    "models": "model_repo",
    "network": "host",
    "dynamic batcher and deadlines": "max_batch_size",
    "processes": "front_workers",
    "limits": "max_body_bytes",
    "operations": "log_format",
}


def default_model_repo() -> Path:
    """The repository shipped inside the `models` package."""
    return pretrained_repo()


class Settings(BaseSettings):
    """Every field is a `VQTOK_<NAME>` environment variable and a `vqtok serve --<name>` flag; its
    `description` is the flag's help (the flags are generated from these fields by `service.commands`)."""

    model_config = SettingsConfigDict(env_prefix="VQTOK_", protected_namespaces=(), extra="ignore")

    # --- models ---
    model_repo: Path = Field(
        default_factory=default_model_repo,
        description="folder of exported model directories, one per model name (or one model directory); "
        "default: the models shipped in the package (models/pretrained), every one served by its name",
    )
    default_model: str | None = Field(
        default=None,
        description="model used when a request names none; unset = the shipped default (DEFAULT_MODEL in models.core.artefacts) "
        "where the repository holds it, else the first ready model by name",
    )
    runtime: Literal["auto", "onnxruntime", "compiled"] = Field(
        default="auto",
        description="what runs the models: auto (the compiled torch runtime on a CUDA host where it can run and passes its parity gate, "
        "else ONNX Runtime), onnxruntime, or compiled (torch.compile + CUDA graphs + the fused code search; needs torch with CUDA)",
    )
    compile_mode: Literal["default", "max-autotune"] = Field(
        default="default",
        description="the compiled runtime's kernels: default, or max-autotune (Inductor times candidate kernels for every "
        "convolution and matmul of each warmed shape and keeps the fastest; minutes a shape and part on an empty cache, "
        "so the first start takes the better part of an hour with the default warm-up; cached in $VQTOK_CACHE afterwards); "
        "it trades that start-up for faster decoding, encode about the same (BENCHMARKS.md)",
    )
    device: Device = Field(default="auto", description="where the models run: auto (CUDA when available, else CPU), cuda or cpu")
    precision: Precision = Field(
        default="auto",
        description="ONNX graphs to run: auto (fp16 on CUDA where fp16 graphs were exported and pass the GPU parity gate, else fp32), "
        "fp32 or fp16",
    )
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="ONNX Runtime threads per session (CPU); unset = ONNX Runtime's choice"
    )
    warmup_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [256], description="comma-separated square image sides in pixels warmed at load, e.g. 256,512"
    )
    warmup_batch_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="comma-separated batch sizes warmed at load; empty = every batch size the runtime runs (its buckets on CUDA, 1 on CPU)",
    )

    # --- network ---
    host: str = Field(default="127.0.0.1", description="address to bind (0.0.0.0 for every interface)")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated Bearer keys for /v1, at least 8 characters each; empty = no auth; health and metrics stay open "
        "(prefer the variable: flags show in ps)",
    )
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated Bearer keys for /v1/admin; empty = the API keys"
    )

    # --- dynamic batcher and deadlines ---
    max_batch_size: int = Field(default=32, ge=1, le=1024, description="images per inference call")
    max_batch_delay_ms: float = Field(
        default=2.0, ge=0, le=1000, description="milliseconds a partial batch waits for more images before it runs"
    )
    max_queue_images: int = Field(
        default=512, ge=1, description="images waiting per model before requests are refused with 503; at least max-images-per-request"
    )
    max_batch_pixels: int | None = Field(
        default=None,
        ge=1,
        description="pixels in one inference call and in all calls running at once, across models: encode counts the images' "
        "H·W, decode the output's h·w·f²; a request holding an image (or grid) above it gets 413; unset = derived from "
        "memory-budget-gib on the CPU (no pixel limit on a GPU)",
    )
    memory_budget_gib: float = Field(
        default=4.0,
        gt=0,
        description="peak resident memory (GiB) a CPU server is sized for: with max-batch-pixels unset, "
        "max-batch-pixels = (memory-budget-gib - 0.5) GiB / 2200 bytes, the worst peak cost of a pixel in a batch of "
        "the shipped f8 model (4 GiB: 1.71 Mpx, one 1024² image or 26 of 256² per call)",
    )
    gpu_mem_limit_gib: float | None = Field(
        default=None,
        gt=0,
        description="ONNX Runtime on CUDA: device memory (GiB) each CUDA memory arena may hold (one arena per session, "
        "or one for the process with cuda-shared-arena); unset = no limit",
    )
    cuda_shared_arena: bool = Field(
        default=False,
        description="ONNX Runtime on CUDA: one device memory arena for every session of the process (the per-shape sessions "
        "and every model) instead of one per session",
    )
    batch_workers: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description="batches one model runs at the same time; unset = 2 on the compiled GPU runtime (the next batch is "
        "staged and queued while one runs: more images/s at high concurrency for a little more latency), 1 on ONNX Runtime",
    )
    request_timeout_s: float = Field(default=30.0, gt=0, description="per-request deadline in seconds; past it the answer is 504")
    retry_after_s: int = Field(default=1, ge=1, description="seconds sent in the Retry-After header of a 503")

    # --- processes ---
    front_workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="front processes (HTTP, image decoding and encoding) in front of one inference process that owns the models "
        "and the batcher, sharing the port; 0 = one process does everything (the default); on a GPU host, about the cores left "
        "for HTTP (12 on 16 cores; service/README.md)",
    )
    front_accept: Literal["balanced", "shared", "reuseport"] = Field(
        default="balanced",
        description="with front-workers, how connections reach the fronts: balanced = the supervisor accepts every connection "
        "and hands it to the fronts in turn, skipping a front that is not serving; shared = every front accepts on one shared "
        "socket (uvicorn --workers' way: whichever front wakes first takes the connection); reuseport = a listening socket "
        "of its own for each front on the same port (SO_REUSEPORT: the kernel spreads connections by their address hash)",
    )
    front_shm_mib: int = Field(
        default=32,
        ge=0,
        le=4096,
        description="with front-workers: MiB of shared memory (/dev/shm) per front for the pixels and tokens it exchanges with "
        "the inference process; what does not fit travels through the control socket instead (slower); 0 = always the socket",
    )

    # --- limits ---
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="request body limit in bytes (64 MiB by default); larger bodies get 413"
    )
    max_images_per_request: int = Field(default=64, ge=1, description="images (encode) or token grids (decode) in one request")
    max_image_pixels: int = Field(
        default=SERVICE_MAX_IMAGE_PIXELS,
        ge=1,
        description="decoded image size limit in pixels, width·height (4096² by default), checked from the header before decoding",
    )
    max_grid_tokens: int = Field(
        default=SERVICE_MAX_GRID_TOKENS,
        ge=1,
        description="token grid limit per image in tokens, h·w (128² by default), for encode and decode; with the pixel limit it "
        "also sets the layouts' max_grid, the largest grid side: min(max-grid-tokens, max-image-pixels / f²)",
    )
    decode_threads: int = Field(default=4, ge=1, le=64, description="threads decoding and encoding images (Pillow)")
    inline_decode_pixels: int = Field(
        default=256 * 256,
        ge=0,
        description="per encode request, images are decoded on the event loop itself, not in the decode threads, up to this many "
        "pixels in total (from their headers; 256² by default, a millisecond or two of the loop): for a small image the hop to "
        "a thread costs more CPU than decoding it (service/README.md); 0 = always the threads",
    )
    default_resize: ResizeMode = Field(
        default=DEFAULT_RESIZE,
        description="resize mode when a request names none: crop (the default, as the clients and vqtok tokenize: short side to "
        "the model's resolution, centre square; every readable photo), pad (edge-replicated up to the next multiple of the "
        "model's downsample factor) or none (sides must already be multiples of it)",
    )

    # --- operations ---
    log_format: Literal["json", "text"] = Field(default="json", description="log lines as JSON objects or plain text")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="least severe level logged (`vqtok -v serve`: debug)"
    )
    shutdown_timeout_s: float = Field(default=30.0, ge=0, description="seconds shutdown waits for in-flight work")
    opentelemetry: bool = Field(
        default=False,
        description="FastAPI's native OpenTelemetry spans, metrics and logs (FastAPI >= 0.165, sent to the providers the "
        "process configures); off by default: its per-request check reads the environment, CPU that every request "
        "pays in the fronts",
    )

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("warmup_sizes", "warmup_batch_sizes", mode="before")
    @classmethod
    def _split_ints(cls, value: object) -> object:
        if isinstance(value, str):
            return [int(v) for v in value.replace(" ", "").split(",") if v]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if any(s < 1 for s in self.warmup_sizes) or any(b < 1 for b in self.warmup_batch_sizes):
            raise ValueError("warmup sizes and batch sizes must be positive")
        if any(len(k) < 8 for k in self.api_keys + self.admin_api_keys):
            raise ValueError("API keys must be at least 8 characters")
        if self.max_queue_images < self.max_images_per_request:
            raise ValueError(
                f"max_queue_images ({self.max_queue_images}) must be at least max_images_per_request "
                f"({self.max_images_per_request}): a request the queue can never hold could only ever be refused"
            )
        return self

    @property
    def admin_keys(self) -> list[str]:
        return self.admin_api_keys or self.api_keys
