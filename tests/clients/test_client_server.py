"""The clients against a real vqtok server on localhost: every input type, both wire formats,
sync and async, and each error status mapped to its exception."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clients.client import AsyncClient, Client
from clients.errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ValidationError,
)
from clients.local import LocalBackend

from .conftest import MODEL_NAME, Server


@pytest.fixture(scope="module")
def photos(photos_val_dir: Path) -> list[Path]:
    return sorted(photos_val_dir.glob("*.jpg"))[:3]


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def reference(runtime: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Direct runtime encoding, one image at a time: the ground truth every path must reproduce."""
    return [runtime.encode(a[None])[0] for a in arrays]


def test_encode_every_input_type_matches_the_runtime(server: Server, runtime: Any, photos: list[Path]) -> None:
    arrays = [rgb(p) for p in photos]  # 256×256 JPEGs: multiples of f=4, so resize=none
    expected = reference(runtime, arrays)
    with Client(server.url) as client:
        inputs: list[list[Any]] = [
            [str(p) for p in photos],
            list(photos),  # pathlib
            [p.read_bytes() for p in photos],
            [Image.open(p) for p in photos],
            arrays,
        ]
        for batch in inputs:
            grids = client.encode(batch, resize="none")
            assert len(grids) == len(photos)
            for g, e in zip(grids, expected, strict=True):
                assert g.dtype == np.int32 and g.shape == (64, 64)
                np.testing.assert_array_equal(g, e)
        single = client.encode(photos[0], resize="none")  # one image in, one grid out
        np.testing.assert_array_equal(single, expected[0])
        stacked = client.encode(np.stack(arrays), resize="none")  # a (B, H, W, 3) array is a batch
        np.testing.assert_array_equal(np.stack(stacked), np.stack(expected))
        as_json = client.encode(photos, wire="json", resize="none")
        np.testing.assert_array_equal(np.stack(as_json), np.stack(expected))


def test_mixed_sizes_keep_order_and_resize_modes(server: Server, runtime: Any, photos: list[Path]) -> None:
    arrays = [rgb(photos[0])[:64, :96], rgb(photos[1])[:48, :48], rgb(photos[2])[:64, :96], rgb(photos[1])[:30, :41]]
    with Client(server.url) as client:
        grids = client.encode(arrays, resize="pad")
        assert [g.shape for g in grids] == [(16, 24), (12, 12), (16, 24), (8, 11)]
        padded = np.pad(arrays[3], ((0, 2), (0, 3), (0, 0)), mode="edge")  # the service's pad rule
        np.testing.assert_array_equal(grids[3], runtime.encode(padded[None])[0])
        np.testing.assert_array_equal(grids[0], reference(runtime, [arrays[0]])[0])
        cropped = client.encode(arrays, resize="crop")  # native resolution 32 -> 8×8 grids
        assert all(g.shape == (8, 8) for g in cropped)


def test_decode_returns_images_in_every_form(server: Server, runtime: Any) -> None:
    rng = np.random.default_rng(0)
    grids = rng.integers(0, 1000, size=(3, 8, 12), dtype=np.int32)
    expected = runtime.decode(grids)
    with Client(server.url) as client:
        pil = client.decode(grids)
        assert all(isinstance(im, Image.Image) and im.size == (48, 32) for im in pil)
        np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), expected)
        arrays = client.decode(list(grids), output="numpy", wire="json")  # base64 PNGs on the wire
        np.testing.assert_array_equal(np.stack(arrays), expected)
        one = client.decode(grids[0], output="numpy")
        np.testing.assert_array_equal(one, expected[0])
        mixed = client.decode([grids[0], grids[1, :4, :4]], output="numpy")
        assert [m.shape for m in mixed] == [(32, 48, 3), (16, 16, 3)]


def test_models_health_ready(server: Server, model_dir: Path) -> None:
    with Client(server.url) as client:
        (card,) = client.models()
        assert card.name == MODEL_NAME and card.codebook_size == 1000 and card.downsample == 4 and card.resolution == 32 and card.ready
        assert client.model(MODEL_NAME).raw["manifest_sha256"]
        assert client.health()["status"] == "ok"
        assert client.ready() is True


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.encode(b"definitely not an image"), BadRequestError),
        (lambda c: c.encode(_png(np.zeros((32, 32, 3), np.uint8))[:60]), BadRequestError),  # truncated PNG
        (lambda c: c.encode(np.zeros((32, 32, 3), np.uint8), model="no-such-model"), NotFoundError),
        (lambda c: c.encode(np.zeros((30, 30, 3), np.uint8), resize="none"), ValidationError),  # not a multiple of f
        (lambda c: c.decode(np.full((4, 4), 1000, np.int32)), ValidationError),  # id outside [0, K)
        (lambda c: c.decode(np.full((4, 4), -1, np.int32)), ValidationError),
        (lambda c: c.model("no-such-model"), NotFoundError),
    ],
)
def test_errors_map_to_exceptions(server: Server, call: Callable[[Client], Any], error: type[Exception]) -> None:
    with Client(server.url, max_retries=0) as client, pytest.raises(error) as info:
        call(client)
    assert info.value.detail  # type: ignore[attr-defined]  # the problem+json detail came through


def test_auth_size_and_deadline_errors(serve: Callable[..., Server]) -> None:
    s = serve(api_keys="sekrit-key-1", max_image_pixels=64 * 64)
    img = np.zeros((32, 32, 3), np.uint8)
    with Client(s.url, max_retries=0) as anonymous, pytest.raises(AuthenticationError):
        anonymous.encode(img)
    with Client(s.url, api_key="wrong-key-1", max_retries=0) as wrong, pytest.raises(AuthenticationError):
        wrong.encode(img)
    with Client(s.url, api_key="sekrit-key-1", max_retries=0) as client:
        assert client.encode(img).shape == (8, 8)
        with pytest.raises(PayloadTooLargeError):
            client.encode(np.zeros((128, 128, 3), np.uint8))
    slow = serve(request_timeout_s=0.001)
    with Client(slow.url, max_retries=0) as client, pytest.raises(RequestTimeoutError):
        client.encode(np.zeros((256, 256, 3), np.uint8))


def test_unreachable_server_raises_connection_error() -> None:
    from tests.helpers import free_port

    with Client(f"http://127.0.0.1:{free_port()}", max_retries=1, timeout=2) as client, pytest.raises(APIConnectionError):
        client.health()


def test_async_client_same_results_and_errors(server: Server, runtime: Any, photos: list[Path]) -> None:
    arrays = [rgb(p) for p in photos]
    expected = reference(runtime, arrays)

    async def run() -> None:
        async with AsyncClient(server.url, max_concurrency=2, max_images_per_request=1) as client:
            for batch in ([str(p) for p in photos], [p.read_bytes() for p in photos], [Image.open(p) for p in photos], arrays):
                grids = await client.encode(batch, resize="none")
                np.testing.assert_array_equal(np.stack(grids), np.stack(expected))
            images = await client.decode(expected, output="numpy")
            np.testing.assert_array_equal(np.stack(images), runtime.decode(np.stack(expected)))
            (card,) = await client.models()
            assert card.name == MODEL_NAME and await client.ready()
            with pytest.raises(BadRequestError):
                await client.encode(b"junk")
            with pytest.raises(NotFoundError):
                await client.encode(arrays[0], model="nope")
            with pytest.raises(ValidationError):
                await client.decode(np.full((2, 2), 5000))
            # concurrent calls on one client
            many = await asyncio.gather(*(client.encode(a, resize="none") for a in arrays))
            np.testing.assert_array_equal(np.stack(many), np.stack(expected))

    asyncio.run(run())


def test_local_backend_matches_the_server(server: Server, model_dir: Path, photos: list[Path]) -> None:
    inputs: list[Any] = [str(photos[0]), photos[1].read_bytes(), Image.open(photos[2]), rgb(photos[0])[:40, :60]]
    with Client(server.url) as client, LocalBackend(model_dir, device="cpu") as local:
        for resize in ("pad", "crop"):
            remote, here = client.encode(inputs, resize=resize), local.encode(inputs, resize=resize)
            for a, b in zip(remote, here, strict=True):
                np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.stack(client.decode(here[:3], output="numpy")), np.stack(local.decode(here[:3], output="numpy")))
        assert local.models()[0].codebook_size == 1000
        with pytest.raises(NotFoundError):
            local.encode(inputs[0], model="nope")
        with pytest.raises(ValidationError):
            local.decode(np.full((2, 2), 1000))
        with pytest.raises(BadRequestError):
            local.encode(b"junk")
