"""What turns prepared images into token ids: a runtime in this process (`RuntimeEncoder`, fed decoded
pixels) or a running service (`ServerEncoder`, fed the stored files), and `encode_batch`, which
isolates the image a batch was refused for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from ..errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError, ValidationError
from .decoding import Prepared
from .format import ErrorKind, ModelSpec

if TYPE_CHECKING:
    from ..client import Client

RUNTIMES = ("auto", "onnxruntime", "compiled")  # models.runtime.choose.RUNTIMES (not imported here: the CLI reads it)


def load_encoder_runtime(
    model_dir: str | Path,
    *,
    runtime: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    intra_op_threads: int | None = None,
    batch_size: int = 32,
    resize: str | None = None,
) -> Any:
    """The runtime a tokenization engine encodes with: `models.runtime.choose.load_runtime`'s rule ("auto":
    the compiled runtime on a CUDA host where it can run, else ONNX Runtime; "onnxruntime" or
    "compiled" forced: one that cannot run is a ModelLoadError). On CUDA, under resize crop (one image
    size, the model's resolution), the encoder is warmed at `batch_size` only: the compiled runtime
    compiles that one graph now (or loads it from `$VQTOK_CACHE/inductor`), and the job's few shorter
    batches (the end of a shard) pad up to it instead of each bucket being compiled and captured at
    start-up, which every Ray actor pays."""
    from models.runtime.choose import load_runtime

    rt = load_runtime(
        model_dir,
        runtime=runtime,
        device=device,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        intra_op_threads=intra_op_threads,
        max_batch_size=batch_size,
    )
    if resize == "crop" and rt.device == "cuda":
        res = rt.info.resolution
        rt.warmup([(res, res)], [batch_size], parts=("encode",))
    return rt


@runtime_checkable
class PixelEncoder(Protocol):
    """What turns a batch of same-sized decoded images into token ids (a runtime)."""

    spec: ModelSpec
    concurrency: int  # batches it may run at the same time
    decode_pool: str  # the decoding pool that keeps it fed ("thread" or "process"), for decode_pool="auto"

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> int32 (B, H/f, W/f)."""
        ...


@runtime_checkable
class FileEncoder(Protocol):
    """What turns encoded image files, as stored, into token ids (a server, which decodes them)."""

    spec: ModelSpec
    concurrency: int
    decode_pool: str

    def encode_files(self, files: Sequence[bytes], resize: str) -> list[np.ndarray]:
        """Encoded images -> int32 (h, w) grids, in order, preprocessed by the pixel rule of `models.core.pixels`."""
        ...


class RuntimeEncoder:
    """Encodes in-process through a runtime (`models.runtime.choose.load_runtime`: ONNX Runtime or the
    compiled GPU runtime).

    On CUDA, by default, three batches run at once (the next ones are copied in and queued while one
    computes, so the device does not wait on the host between batches) and images decode in processes
    (threads, held back by the GIL, cannot decode as fast as a GPU encodes); on the CPU one batch at a
    time (the session's thread pool already uses every core) and decoding threads
    (bench/tokenize_local_sweep.py compares the settings)."""

    def __init__(self, runtime: Any, concurrency: int | None = None) -> None:
        self.runtime, self.spec = runtime, ModelSpec.from_info(runtime.info)
        on_cuda = getattr(runtime, "device", "cpu") == "cuda"
        self.concurrency = concurrency or (3 if on_cuda else 1)
        self.decode_pool = "process" if on_cuda else "thread"

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.runtime.encode(pixels), dtype=np.int32)


class ServerEncoder:
    """Encodes through a running vqtok service. The stored bytes go as they are (a JPEG stays a
    JPEG: nothing is decoded or re-encoded here) with the job's resize mode; the server preprocesses
    them by the same pixel rule (`models.core.pixels`) as the local engines, so the tokens match theirs. The
    server's limits (pixels per image, tokens per request) apply."""

    def __init__(self, client: Client, model: str | None, concurrency: int = 4) -> None:
        card = client.model(model or client.default_model())
        self.client, self.model = client, card.name
        raw = card.raw
        self.spec = ModelSpec(
            card.name,
            card.codebook_size,
            card.downsample,
            card.resolution,
            str(raw.get("manifest_sha256", "")),
            str(raw.get("precision", "")),
        )
        self.concurrency = concurrency
        self.decode_pool = "thread"  # its workers only read files and headers

    def encode_files(self, files: Sequence[bytes], resize: str) -> list[np.ndarray]:
        return list(self.client.encode(list(files), model=self.model, resize=resize))


# what refuses one image rather than the job: the runtime's InvalidInputError (a ValueError); the
# server's 400 (undecodable), 413 (too large), 415 (format) and 422 (shape) answers
REFUSALS: tuple[type[Exception], ...] = (ValueError, BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError, ValidationError)
UNREADABLE_REFUSALS: tuple[type[Exception], ...] = (BadRequestError, UnsupportedMediaTypeError)  # bytes it could not decode

Encoded = tuple[Prepared, np.ndarray | None, str | None, ErrorKind | None]  # the image, its token grid or None, why not, its kind


def _refusal(exc: Exception) -> tuple[str, ErrorKind]:
    return f"{type(exc).__name__}: {exc}", "unreadable" if isinstance(exc, UNREADABLE_REFUSALS) else "refused"


def encode_pixels(encoder: PixelEncoder, pixels: np.ndarray) -> list[tuple[np.ndarray | None, str | None, ErrorKind | None]]:
    """`encode_batch` for an already stacked uint8 (B, H, W, 3) array (the Ray engine's batches):
    (token grid or None, why not, its kind) per image."""
    try:
        tokens = encoder.encode(pixels)
    except REFUSALS as exc:
        if len(pixels) == 1:
            return [(None, *_refusal(exc))]
        return [r for i in range(len(pixels)) for r in encode_pixels(encoder, pixels[i : i + 1])]
    if len(tokens) != len(pixels):  # a count mismatch is a bug, not a refusal
        raise RuntimeError(f"the encoder answered {len(tokens)} grids for {len(pixels)} images")
    return [(t, None, None) for t in tokens]


def encode_batch(encoder: PixelEncoder | FileEncoder, batch: list[Prepared], resize: str = "none") -> list[Encoded]:
    """Encode same-shaped images (or encoded files, for a `FileEncoder`); when the batch is refused,
    retry image by image to isolate the cause."""
    try:
        if isinstance(encoder, FileEncoder):
            tokens: Sequence[np.ndarray] | np.ndarray = encoder.encode_files([p.data for p in batch if p.data is not None], resize)
        else:
            tokens = encoder.encode(np.stack([p.pixels for p in batch if p.pixels is not None]))
    except REFUSALS as exc:
        if len(batch) == 1:
            return [(batch[0], None, *_refusal(exc))]
        return [r for p in batch for r in encode_batch(encoder, [p], resize)]
    # a count mismatch is a bug, not a refusal
    return [(p, t, None, None) for p, t in zip(batch, tokens, strict=True)]
