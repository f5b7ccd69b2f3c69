"""`LocalBackend`: the `Client` interface, run in-process on a model directory (no HTTP, no server).

    with LocalBackend("photo-f8-simvq-16k-v2") as backend: # a shipped name, a directory, or ORG/NAME on the hub
        grids = backend.encode(["a.jpg", "b.png"])  # resize crop, as the server's default
        images = backend.decode(grids)
        seqs = backend.encode_sequences(["a.jpg"], layout="chameleon", vocab_offset=32000)

Images are preprocessed by the one pixel rule (`models.core.pixels`) the service uses, so the tokens equal what a
server running the same model returns; errors are the same typed exceptions a server answer maps to.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, cast, overload

import numpy as np
from PIL import Image

from models.core import pixels as _images
from models.core.artefacts import Device, Precision, model_name, resolve_model_dir
from models.core.errors import ImageError, ImageShapeError, ImageTooLarge, InvalidInputError
from models.core.layouts import EMU3_NEEDS_TEXT, Layout, LayoutError, grid_side_limit
from models.runtime.choose import load_runtime

from . import _base
from ._base import DEFAULT_RESIZE, DecodedSequence, ImageInput, Images, LayoutArg, ModelCard, Output, SingleImage
from .errors import BadRequestError, NotFoundError, PayloadTooLargeError, ValidationError


class LocalBackend:
    """One model directory served in-process by the runtime `vqtok serve` would pick (`models.runtime.choose.load_runtime`).

    Args:
        model_dir: an exported model (manifest.json, encoder.onnx, decoder.onnx), named as everywhere in
            vqtok (`models.core.artefacts.resolve_model_dir`): a directory, the NAME of a shipped model,
            ORG/NAME[@REVISION] on the Hugging Face hub (needs huggingface_hub), or None for the default
            model. Raises `models.core.errors.ModelNotFound` / `ModelLoadError` when it cannot be used.
        device, precision: as for `ModelRuntime.load` ("auto" picks CUDA when available).
        runtime: "auto" (the compiled runtime on a CUDA host where torch can run it, else ONNX Runtime),
            "onnxruntime" or "compiled" (forced: one that cannot run raises `ModelLoadError`), as `vqtok serve --runtime`.
        max_batch_size: images per runtime call.
        workers: threads decoding and resizing images.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        device: Device = "auto",
        precision: Precision = "auto",
        max_batch_size: int = 32,
        workers: int | None = None,
        runtime: str = "auto",
    ) -> None:
        path = resolve_model_dir(model_dir)
        self.runtime = load_runtime(
            path, runtime=runtime, name=model_name(path), device=device, precision=precision, max_batch_size=max_batch_size
        )
        self.info = self.runtime.info
        self.max_batch_size = max_batch_size
        self._pool = ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) + 1), thread_name_prefix="vqtok-local")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.info.name:
            raise NotFoundError(404, "Not Found", f"unknown model {model!r}; this backend runs {self.info.name!r}")

    def _prepare(self, index: int, image: ImageInput, resize: str) -> _images.PreparedImage:
        part = _base.prepare_image(index, image)
        try:
            return _images.prepare(
                part.data, downsample=self.info.downsample, resolution=self.info.resolution, resize=cast(_images.ResizeMode, resize)
            )
        except ImageTooLarge as exc:
            raise PayloadTooLargeError(413, "Content Too Large", f"images[{index}]: {exc}") from exc
        except ImageShapeError as exc:
            raise ValidationError(422, "Unprocessable Content", f"images[{index}]: {exc}") from exc
        except ImageError as exc:
            raise BadRequestError(400, "Bad Request", f"images[{index}]: {exc}") from exc

    def _batched(self, fn: Callable[[np.ndarray], np.ndarray], arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run `fn` on same-shaped arrays in batches of max_batch_size; results in input order."""
        out: list[np.ndarray | None] = [None] * len(arrays)
        for idx in _base.group_grids(arrays, self.max_batch_size):
            try:
                result = fn(np.stack([arrays[i] for i in idx]))
            except InvalidInputError as exc:
                raise ValidationError(422, "Unprocessable Content", str(exc)) from exc
            for j, i in enumerate(idx):
                out[i] = result[j]
        return _base.filled(out)

    @overload
    def encode(  # type: ignore[overload-overlap]  # a str is a Sequence too: this overload takes it first
        self, images: SingleImage, *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: str = "npy"
    ) -> np.ndarray: ...
    @overload
    def encode(
        self, images: Sequence[ImageInput], *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: str = "npy"
    ) -> list[np.ndarray]: ...
    @overload  # an array is one image or a batch: only its ndim says which
    def encode(self, images: np.ndarray, *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: str = "npy") -> Any: ...
    def encode(
        self, images: Images, *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: str = "npy"
    ) -> np.ndarray | list[np.ndarray]:
        """See `Client.encode`; `wire` is accepted for compatibility and ignored."""
        single, grids = self._encode(images, model, resize)
        return grids[0] if single else grids

    def _encode(self, images: Images, model: str | None, resize: str | None) -> tuple[bool, list[np.ndarray]]:
        self._check_model(model)
        single, items = _base.as_image_list(images)
        mode = resize or DEFAULT_RESIZE
        prepared = list(self._pool.map(lambda p: self._prepare(p[0], p[1], mode), enumerate(items)))
        return single, [g.astype(np.int32, copy=False) for g in self._batched(self.runtime.encode, [p.pixels for p in prepared])]

    @property
    def max_grid(self) -> int:
        """The layouts' largest grid side, by the service's rule with its default limits: min(128², 4096² / f²)."""
        return grid_side_limit(_images.SERVICE_MAX_GRID_TOKENS, _images.SERVICE_MAX_IMAGE_PIXELS, self.info.downsample)

    def layout(self, layout: LayoutArg, vocab_offset: int = 0, max_grid: int | None = None) -> Layout:
        """The Layout a preset's name (with offset and grid limit) makes for this model, as a server would
        build it; a Layout given is checked against the model's codebook size."""
        own = _base.caller_layout(layout, vocab_offset, max_grid)
        if own is not None:
            _base.check_layout_model(own, self.info.codebook_size, self.info.name)
            return own
        if layout == "emu3":
            raise ValidationError(422, "Unprocessable Content", EMU3_NEEDS_TEXT)
        try:
            return Layout(str(layout), vocab_offset=vocab_offset, codebook_size=self.info.codebook_size, max_grid=max_grid or self.max_grid)
        except LayoutError as exc:
            raise ValidationError(422, "Unprocessable Content", str(exc)) from exc

    @overload
    def encode_sequences(  # type: ignore[overload-overlap]  # a str is a Sequence too: this overload takes it first
        self,
        images: SingleImage,
        *,
        layout: LayoutArg,
        vocab_offset: int = 0,
        max_grid: int | None = None,
        model: str | None = None,
        resize: str | None = DEFAULT_RESIZE,
        wire: str = "npy",
    ) -> np.ndarray: ...
    @overload
    def encode_sequences(
        self,
        images: Sequence[ImageInput],
        *,
        layout: LayoutArg,
        vocab_offset: int = 0,
        max_grid: int | None = None,
        model: str | None = None,
        resize: str | None = DEFAULT_RESIZE,
        wire: str = "npy",
    ) -> list[np.ndarray]: ...
    @overload
    def encode_sequences(
        self,
        images: np.ndarray,
        *,
        layout: LayoutArg,
        vocab_offset: int = 0,
        max_grid: int | None = None,
        model: str | None = None,
        resize: str | None = DEFAULT_RESIZE,
        wire: str = "npy",
    ) -> Any: ...
    def encode_sequences(
        self,
        images: Images,
        *,
        layout: LayoutArg,
        vocab_offset: int = 0,
        max_grid: int | None = None,
        model: str | None = None,
        resize: str | None = DEFAULT_RESIZE,
        wire: str = "npy",
    ) -> np.ndarray | list[np.ndarray]:
        """See `Client.encode_sequences` (the same ids a server running this model answers)."""
        chosen = self.layout(layout, vocab_offset, max_grid)
        single, grids = self._encode(images, model, resize)
        sequences = _base.local_sequences(chosen, grids)
        return sequences[0] if single else sequences

    def decode_sequence(
        self,
        sequence: Sequence[int] | np.ndarray,
        *,
        layout: LayoutArg,
        vocab_offset: int = 0,
        grid: tuple[int, int] | None = None,
        repair: bool = False,
        max_grid: int | None = None,
        model: str | None = None,
        output: Output = "pil",
    ) -> DecodedSequence:
        """See `Client.decode_sequence`."""
        self._check_model(model)
        chosen = self.layout(layout, vocab_offset, max_grid)
        spans = _base.local_spans(chosen, _base.sequence_ids(sequence), grid, repair)
        images = self.decode([s.grid.astype(np.int32) for s in spans], output=output) if spans else []
        return DecodedSequence(list(images), [_base.span_info(s) for s in spans])

    @overload
    def decode(
        self, tokens: Sequence[np.ndarray], *, model: str | None = None, output: Literal["pil"] = "pil", wire: str = "npy"
    ) -> list[Image.Image]: ...
    @overload
    def decode(
        self, tokens: Sequence[np.ndarray], *, model: str | None = None, output: Literal["numpy"], wire: str = "npy"
    ) -> list[np.ndarray]: ...
    @overload  # an array is one grid or a batch (only its ndim says which); nested lists are one grid
    def decode(
        self, tokens: np.ndarray | Sequence[Sequence[Any]], *, model: str | None = None, output: Output = "pil", wire: str = "npy"
    ) -> Any: ...
    def decode(
        self, tokens: np.ndarray | Sequence[Any], *, model: str | None = None, output: Output = "pil", wire: str = "npy"
    ) -> Image.Image | np.ndarray | list[Image.Image] | list[np.ndarray]:
        """See `Client.decode`."""
        self._check_model(model)
        single, grids = _base.as_grid_list(tokens)
        images = _base.to_output(self._batched(self.runtime.decode, grids), output)
        return images[0] if single else images

    def models(self) -> list[ModelCard]:
        return [self.model(self.info.name)]

    def model(self, name: str) -> ModelCard:
        self._check_model(name)
        body = {k: getattr(self.info, k) for k in self.info.__dataclass_fields__} | {
            "ready": True,
            "providers": list(self.runtime.providers),
        }
        return ModelCard.from_json(body)

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
