"""HTTP clients for the vqtok service: `Client` (sync) and `AsyncClient`, the same methods on both.

    with Client("http://127.0.0.1:8000") as client:
        grids = client.encode(["a.jpg", "b.png"])                    # list of int32 (h, w) arrays (resize crop)
        images = client.decode(grids)                                # list of PIL images
        seqs = client.encode_sequences(["a.jpg"], layout="lumina", vocab_offset=32000)  # LLM ids, int64 (L,) each
        found = client.decode_sequence(llm_output_ids, layout="lumina", vocab_offset=32000)  # .images, .spans

Request building and response parsing live in `_base`; retries in `_retry` (a transport wrapper).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar, overload

import httpx
import numpy as np
from PIL import Image

from . import _base
from ._base import (
    DEFAULT_RESIZE,
    DecodedSequence,
    ImageInput,
    ImagePart,
    Images,
    LayoutArg,
    LayoutFields,
    ModelCard,
    Output,
    RequestSpec,
    SingleImage,
    Wire,
)
from ._retry import NO_RETRY, AsyncRetryTransport, RetryPolicy, RetryTransport
from .errors import APIConnectionError, APIStatusError, APITimeoutError, VqtokError

T = TypeVar("T")
R = TypeVar("R")


class _Settings:
    """Constructor arguments shared by both clients, validated once."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        max_retries: int,
        max_concurrency: int,
        max_images_per_request: int,
        max_request_bytes: int,
        headers: dict[str, str] | None,
    ) -> None:
        if max_concurrency < 1 or max_images_per_request < 1 or max_request_bytes < 1:
            raise ValueError("max_concurrency, max_images_per_request and max_request_bytes must be positive")
        self.base_url, api_key = _base.resolve(base_url, api_key)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.policy = RetryPolicy(max_retries=max_retries)
        self.max_concurrency = max_concurrency
        self.max_images = max_images_per_request
        self.max_bytes = max_request_bytes
        self.headers = {**_base.auth_headers(api_key), **(headers or {})}
        self.limits_known = False
        # enough pooled connections for the concurrent chunks of one call
        self.pool_limits = httpx.Limits(max_connections=max(10, 2 * max_concurrency), max_keepalive_connections=max(5, max_concurrency))

    def apply_limits(self, limits: tuple[int, int] | None) -> None:
        if limits is not None:
            images, body = limits
            self.max_images = max(1, min(self.max_images, images))
            self.max_bytes = max(1, min(self.max_bytes, body - 64 * 1024))  # room for multipart framing
        self.limits_known = True


def _split(chunk: Sequence[T]) -> tuple[Sequence[T], Sequence[T]]:
    half = len(chunk) // 2
    return chunk[:half], chunk[half:]


class Client:
    """Synchronous client. Thread-safe; use as a context manager or call `close()`.

    Args:
        base_url: server address (default `$VQTOK_BASE_URL` or http://127.0.0.1:8000).
        api_key: Bearer key when the server requires one (default `$VQTOK_API_KEY`).
        timeout: seconds or an `httpx.Timeout` (default 120 s, 5 s to connect).
        max_retries: retries of 408/429/503/504 and connection errors, with backoff and Retry-After.
        max_concurrency: requests in flight at once when a call is split into several.
        max_images_per_request, max_request_bytes: how large one request may be (the server's defaults
            are 64 images and 64 MiB); larger inputs are split, and a 413 splits a request further.
        transport: an `httpx.BaseTransport` (e.g. `httpx.MockTransport`) for tests.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = _base.DEFAULT_TIMEOUT,
        max_retries: int = _base.DEFAULT_MAX_RETRIES,
        max_concurrency: int = 4,
        max_images_per_request: int = 64,
        max_request_bytes: int = 32 * 1024 * 1024,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        s = _Settings(base_url, api_key, timeout, max_retries, max_concurrency, max_images_per_request, max_request_bytes, headers)
        self._s = s
        inner = transport or httpx.HTTPTransport(limits=s.pool_limits)
        self._http = httpx.Client(base_url=s.base_url, timeout=s.timeout, headers=s.headers, transport=RetryTransport(inner, s.policy))

    # --- plumbing ---
    def _send(self, spec: RequestSpec, extensions: dict[str, Any] | None = None) -> httpx.Response:
        request = self._http.build_request(spec.method, spec.url, extensions=extensions, **spec.kwargs)
        try:
            return self._http.send(request)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"{spec.method} {spec.url}: timed out ({exc})") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{spec.method} {spec.url}: cannot reach {self._s.base_url} ({exc})") from exc

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if len(items) <= 1 or self._s.max_concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(self._s.max_concurrency, len(items)), thread_name_prefix="vqtok-client") as pool:
            return list(pool.map(fn, items))

    # --- API ---
    @overload
    def encode(  # type: ignore[overload-overlap]  # a str is a Sequence too: this overload takes it first
        self, images: SingleImage, *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: Wire = "npy"
    ) -> np.ndarray: ...
    @overload
    def encode(
        self, images: Sequence[ImageInput], *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: Wire = "npy"
    ) -> list[np.ndarray]: ...
    @overload  # an array is one image or a batch: only its ndim says which
    def encode(self, images: np.ndarray, *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: Wire = "npy") -> Any: ...
    def encode(
        self, images: Images, *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: Wire = "npy"
    ) -> np.ndarray | list[np.ndarray]:
        """Images -> int32 token grids (h, w).

        `images` is one image or a sequence of them; each may be a path, encoded bytes, a PIL image or
        a uint8 (H, W, 3) array (a (B, H, W, 3) array is a batch). One image gives one array, a sequence
        gives a list in input order. `resize` is "crop" (the default: every readable photo, the model's
        native square), "pad" or "none"; None leaves it to the server's default.
        """
        single, grids = self._encode(images, model, resize, wire, None)
        return grids[0] if single else grids

    def _encode(
        self, images: Images, model: str | None, resize: str | None, wire: Wire, fields: LayoutFields | None
    ) -> tuple[bool, list[np.ndarray]]:
        single, items = _base.as_image_list(images)
        parts = self._map(lambda p: _base.prepare_image(*p), list(enumerate(items)))
        if len(parts) > 1:
            self._learn_limits()
        chunks = _base.plan_encode(parts, resize, self._s.max_images, self._s.max_bytes)
        results = self._map(lambda c: self._encode_chunk(c, model, resize, wire, fields), chunks)
        return single, _base.assemble(chunks, results, len(parts))

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
        wire: Wire = "npy",
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
        wire: Wire = "npy",
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
        wire: Wire = "npy",
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
        wire: Wire = "npy",
    ) -> np.ndarray | list[np.ndarray]:
        """Images -> the LLM id sequence of each image, int64 (L,): image code k is `vocab_offset + k`,
        the layout's special tokens follow the K codes (`models.core.layouts`).

        `layout` is a preset's name ("plain", "chameleon", "lumina"; the server builds it, with its own
        largest grid side unless `max_grid` is given), or a `models.core.layouts.Layout` built by the
        caller, e.g. `read_layout("DIR/vqtok_vocab.json")`, applied here to the server's grids: the way
        to emu3, whose size text needs the LLM's text tokenizer. One image gives one array, a sequence a list.
        """
        own = _base.caller_layout(layout, vocab_offset, max_grid)
        if own is not None:
            single, grids = self._encode(images, model, resize, wire, None)
            card = self.model(model or self.default_model())
            _base.check_layout_model(own, card.codebook_size, card.name)
            sequences = _base.local_sequences(own, grids)
        else:
            single, sequences = self._encode(images, model, resize, wire, LayoutFields(str(layout), vocab_offset, max_grid))
        return sequences[0] if single else sequences

    def _learn_limits(self) -> None:
        """Once per client: cap request sizes at the limits the server states in `GET /v1/models`."""
        if self._s.limits_known:
            return
        try:
            limits = _base.server_limits(self._send(RequestSpec("GET", "/v1/models", {})))
        except VqtokError:
            limits = None  # the call itself will report what is wrong
        self._s.apply_limits(limits)

    def _encode_chunk(
        self, parts: Sequence[ImagePart], model: str | None, resize: str | None, wire: Wire, fields: LayoutFields | None = None
    ) -> list[np.ndarray]:
        parse = _base.parse_encode if fields is None else _base.parse_encode_sequences
        try:
            return parse(self._send(_base.encode_request(parts, model, resize, wire, fields)), len(parts))
        except APIStatusError as exc:
            if not _base.is_split_worthy(exc, len(parts)):
                raise
            a, b = _split(parts)
            return self._encode_chunk(a, model, resize, wire, fields) + self._encode_chunk(b, model, resize, wire, fields)

    @overload
    def decode(
        self, tokens: Sequence[np.ndarray], *, model: str | None = None, output: Literal["pil"] = "pil", wire: Wire = "npy"
    ) -> list[Image.Image]: ...
    @overload
    def decode(
        self, tokens: Sequence[np.ndarray], *, model: str | None = None, output: Literal["numpy"], wire: Wire = "npy"
    ) -> list[np.ndarray]: ...
    @overload  # an array is one grid or a batch (only its ndim says which); nested lists are one grid
    def decode(
        self, tokens: np.ndarray | Sequence[Sequence[Any]], *, model: str | None = None, output: Output = "pil", wire: Wire = "npy"
    ) -> Any: ...
    def decode(
        self, tokens: np.ndarray | Sequence[Any], *, model: str | None = None, output: Output = "pil", wire: Wire = "npy"
    ) -> Image.Image | np.ndarray | list[Image.Image] | list[np.ndarray]:
        """Token grids -> images. `tokens` is one (h, w) grid, a (B, h, w) array or a list of grids
        (shapes may differ). Returns one image or a list, as PIL images or uint8 (H, W, 3) arrays."""
        single, grids = _base.as_grid_list(tokens)
        if len(grids) > 1:
            self._learn_limits()
        batches = _base.group_grids(grids, self._s.max_images)
        results = self._map(lambda idx: self._decode_batch(np.stack([grids[i] for i in idx]), model, wire), batches)
        out: list[Any] = [None] * len(grids)
        for idx, imgs in zip(batches, results, strict=True):
            for i, im in zip(idx, _base.to_output(imgs, output), strict=True):
                out[i] = im
        return out[0] if single else out

    def _decode_batch(self, grids: np.ndarray, model: str | None, wire: Wire) -> list[np.ndarray]:
        try:
            return _base.parse_decode(self._send(_base.decode_request(grids, model, wire)), len(grids))
        except APIStatusError as exc:
            if not _base.is_split_worthy(exc, len(grids)):
                raise
            half = len(grids) // 2
            return self._decode_batch(grids[:half], model, wire) + self._decode_batch(grids[half:], model, wire)

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
        """An LLM's output (text ids around any number of image spans) -> its images, one per span, and
        the spans (`DecodedSequence.images`, `.spans`: start, end, grid, what repair changed).

        A malformed span raises `InvalidSequenceError` (422) with its `span` index and `position`;
        `repair=True` mends it instead and says how in `spans[i].changes`. `grid` (h, w) is needed for
        `plain` (no delimiters) and is the size of every `chameleon` span (default: square spans).
        `layout` as for `encode_sequences`: a Layout given here is parsed here, its grids decoded by the server.
        """
        ids = _base.sequence_ids(sequence)
        own = _base.caller_layout(layout, vocab_offset, max_grid)
        if own is None:
            spec = _base.decode_sequence_request(ids, str(layout), vocab_offset, grid, repair, max_grid, model)
            return _base.parse_decode_sequence(self._send(spec), output)
        spans = _base.local_spans(own, ids, grid, repair)
        card = self.model(model or self.default_model())
        _base.check_layout_model(own, card.codebook_size, card.name)
        images = self.decode([s.grid.astype(np.int32) for s in spans], model=card.name, output=output) if spans else []
        return DecodedSequence(list(images), [_base.span_info(s) for s in spans])

    def models(self) -> list[ModelCard]:
        """The served models."""
        response = self._send(RequestSpec("GET", "/v1/models", {}))
        _base.raise_for_status(response)
        return _base.parse_models(response)

    def default_model(self) -> str:
        """The model the server uses when a request names none."""
        response = self._send(RequestSpec("GET", "/v1/models", {}))
        _base.raise_for_status(response)
        return _base.parse_default_model(response)

    def model(self, name: str) -> ModelCard:
        response = self._send(RequestSpec("GET", f"/v1/models/{name}", {}))
        _base.raise_for_status(response)
        return ModelCard.from_json(response.json())

    def health(self) -> dict[str, Any]:
        """`GET /healthz` (liveness); raises when the server is unreachable or unhealthy."""
        response = self._send(RequestSpec("GET", "/healthz", {}))
        _base.raise_for_status(response)
        return dict(response.json())

    def ready(self) -> bool:
        """`GET /readyz`: True once the models are loaded and warmed. Never retried."""
        response = self._send(RequestSpec("GET", "/readyz", {}), extensions={NO_RETRY: True})
        return response.status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """Asynchronous client: the same methods as `Client`, as coroutines. Use `async with` or `aclose()`."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = _base.DEFAULT_TIMEOUT,
        max_retries: int = _base.DEFAULT_MAX_RETRIES,
        max_concurrency: int = 4,
        max_images_per_request: int = 64,
        max_request_bytes: int = 32 * 1024 * 1024,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        s = _Settings(base_url, api_key, timeout, max_retries, max_concurrency, max_images_per_request, max_request_bytes, headers)
        self._s = s
        inner = transport or httpx.AsyncHTTPTransport(limits=s.pool_limits)
        self._http = httpx.AsyncClient(
            base_url=s.base_url, timeout=s.timeout, headers=s.headers, transport=AsyncRetryTransport(inner, s.policy)
        )

    async def _send(self, spec: RequestSpec, extensions: dict[str, Any] | None = None) -> httpx.Response:
        request = self._http.build_request(spec.method, spec.url, extensions=extensions, **spec.kwargs)
        try:
            return await self._http.send(request)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"{spec.method} {spec.url}: timed out ({exc})") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{spec.method} {spec.url}: cannot reach {self._s.base_url} ({exc})") from exc

    async def _map(self, fn: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
        gate = asyncio.Semaphore(self._s.max_concurrency)

        async def one(x: T) -> Any:
            async with gate:
                return await fn(x)

        return list(await asyncio.gather(*(one(x) for x in items)))

    @overload
    async def encode(  # type: ignore[overload-overlap]  # a str is a Sequence too: this overload takes it first
        self, images: SingleImage, *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: Wire = "npy"
    ) -> np.ndarray: ...
    @overload
    async def encode(
        self, images: Sequence[ImageInput], *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: Wire = "npy"
    ) -> list[np.ndarray]: ...
    @overload  # an array is one image or a batch: only its ndim says which
    async def encode(
        self, images: np.ndarray, *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: Wire = "npy"
    ) -> Any: ...
    async def encode(
        self, images: Images, *, model: str | None = None, resize: str | None = DEFAULT_RESIZE, wire: Wire = "npy"
    ) -> np.ndarray | list[np.ndarray]:
        """See `Client.encode`. File reading and PNG encoding run in a worker thread."""
        single, grids = await self._encode(images, model, resize, wire, None)
        return grids[0] if single else grids

    async def _encode(
        self, images: Images, model: str | None, resize: str | None, wire: Wire, fields: LayoutFields | None
    ) -> tuple[bool, list[np.ndarray]]:
        single, items = _base.as_image_list(images)
        parts = await asyncio.to_thread(lambda: [_base.prepare_image(i, x) for i, x in enumerate(items)])
        if len(parts) > 1:
            await self._learn_limits()
        chunks = await asyncio.to_thread(_base.plan_encode, parts, resize, self._s.max_images, self._s.max_bytes)
        results = await self._map(lambda c: self._encode_chunk(c, model, resize, wire, fields), chunks)
        return single, _base.assemble(chunks, results, len(parts))

    @overload
    async def encode_sequences(  # type: ignore[overload-overlap]  # a str is a Sequence too: this overload takes it first
        self,
        images: SingleImage,
        *,
        layout: LayoutArg,
        vocab_offset: int = 0,
        max_grid: int | None = None,
        model: str | None = None,
        resize: str | None = DEFAULT_RESIZE,
        wire: Wire = "npy",
    ) -> np.ndarray: ...
    @overload
    async def encode_sequences(
        self,
        images: Sequence[ImageInput],
        *,
        layout: LayoutArg,
        vocab_offset: int = 0,
        max_grid: int | None = None,
        model: str | None = None,
        resize: str | None = DEFAULT_RESIZE,
        wire: Wire = "npy",
    ) -> list[np.ndarray]: ...
    @overload
    async def encode_sequences(
        self,
        images: np.ndarray,
        *,
        layout: LayoutArg,
        vocab_offset: int = 0,
        max_grid: int | None = None,
        model: str | None = None,
        resize: str | None = DEFAULT_RESIZE,
        wire: Wire = "npy",
    ) -> Any: ...
    async def encode_sequences(
        self,
        images: Images,
        *,
        layout: LayoutArg,
        vocab_offset: int = 0,
        max_grid: int | None = None,
        model: str | None = None,
        resize: str | None = DEFAULT_RESIZE,
        wire: Wire = "npy",
    ) -> np.ndarray | list[np.ndarray]:
        """See `Client.encode_sequences`."""
        own = _base.caller_layout(layout, vocab_offset, max_grid)
        if own is not None:
            single, grids = await self._encode(images, model, resize, wire, None)
            card = await self.model(model or await self.default_model())
            _base.check_layout_model(own, card.codebook_size, card.name)
            sequences = _base.local_sequences(own, grids)
        else:
            single, sequences = await self._encode(images, model, resize, wire, LayoutFields(str(layout), vocab_offset, max_grid))
        return sequences[0] if single else sequences

    async def _learn_limits(self) -> None:
        if self._s.limits_known:
            return
        try:
            limits = _base.server_limits(await self._send(RequestSpec("GET", "/v1/models", {})))
        except VqtokError:
            limits = None
        self._s.apply_limits(limits)

    async def _encode_chunk(
        self, parts: Sequence[ImagePart], model: str | None, resize: str | None, wire: Wire, fields: LayoutFields | None = None
    ) -> list[np.ndarray]:
        parse = _base.parse_encode if fields is None else _base.parse_encode_sequences
        try:
            return parse(await self._send(_base.encode_request(parts, model, resize, wire, fields)), len(parts))
        except APIStatusError as exc:
            if not _base.is_split_worthy(exc, len(parts)):
                raise
            a, b = _split(parts)
            return await self._encode_chunk(a, model, resize, wire, fields) + await self._encode_chunk(b, model, resize, wire, fields)

    @overload
    async def decode(
        self, tokens: Sequence[np.ndarray], *, model: str | None = None, output: Literal["pil"] = "pil", wire: Wire = "npy"
    ) -> list[Image.Image]: ...
    @overload
    async def decode(
        self, tokens: Sequence[np.ndarray], *, model: str | None = None, output: Literal["numpy"], wire: Wire = "npy"
    ) -> list[np.ndarray]: ...
    @overload  # an array is one grid or a batch (only its ndim says which); nested lists are one grid
    async def decode(
        self, tokens: np.ndarray | Sequence[Sequence[Any]], *, model: str | None = None, output: Output = "pil", wire: Wire = "npy"
    ) -> Any: ...
    async def decode(
        self, tokens: np.ndarray | Sequence[Any], *, model: str | None = None, output: Output = "pil", wire: Wire = "npy"
    ) -> Image.Image | np.ndarray | list[Image.Image] | list[np.ndarray]:
        """See `Client.decode`."""
        single, grids = _base.as_grid_list(tokens)
        if len(grids) > 1:
            await self._learn_limits()
        batches = _base.group_grids(grids, self._s.max_images)
        results = await self._map(lambda idx: self._decode_batch(np.stack([grids[i] for i in idx]), model, wire), batches)
        out: list[Any] = [None] * len(grids)
        for idx, imgs in zip(batches, results, strict=True):
            for i, im in zip(idx, _base.to_output(imgs, output), strict=True):
                out[i] = im
        return out[0] if single else out

    async def _decode_batch(self, grids: np.ndarray, model: str | None, wire: Wire) -> list[np.ndarray]:
        try:
            return _base.parse_decode(await self._send(_base.decode_request(grids, model, wire)), len(grids))
        except APIStatusError as exc:
            if not _base.is_split_worthy(exc, len(grids)):
                raise
            half = len(grids) // 2
            return await self._decode_batch(grids[:half], model, wire) + await self._decode_batch(grids[half:], model, wire)

    async def decode_sequence(
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
        ids = _base.sequence_ids(sequence)
        own = _base.caller_layout(layout, vocab_offset, max_grid)
        if own is None:
            spec = _base.decode_sequence_request(ids, str(layout), vocab_offset, grid, repair, max_grid, model)
            return await asyncio.to_thread(_base.parse_decode_sequence, await self._send(spec), output)
        spans = _base.local_spans(own, ids, grid, repair)
        card = await self.model(model or await self.default_model())
        _base.check_layout_model(own, card.codebook_size, card.name)
        images = await self.decode([s.grid.astype(np.int32) for s in spans], model=card.name, output=output) if spans else []
        return DecodedSequence(list(images), [_base.span_info(s) for s in spans])

    async def models(self) -> list[ModelCard]:
        response = await self._send(RequestSpec("GET", "/v1/models", {}))
        _base.raise_for_status(response)
        return _base.parse_models(response)

    async def default_model(self) -> str:
        """The model the server uses when a request names none."""
        response = await self._send(RequestSpec("GET", "/v1/models", {}))
        _base.raise_for_status(response)
        return _base.parse_default_model(response)

    async def model(self, name: str) -> ModelCard:
        response = await self._send(RequestSpec("GET", f"/v1/models/{name}", {}))
        _base.raise_for_status(response)
        return ModelCard.from_json(response.json())

    async def health(self) -> dict[str, Any]:
        response = await self._send(RequestSpec("GET", "/healthz", {}))
        _base.raise_for_status(response)
        return dict(response.json())

    async def ready(self) -> bool:
        response = await self._send(RequestSpec("GET", "/readyz", {}), extensions={NO_RETRY: True})
        return response.status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
