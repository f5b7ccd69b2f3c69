"""Encode -> decode over real HTTP in every input and output format, against the runtime called
directly (the same exported graphs, no server in between)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.runtime.onnx import ModelRuntime

from .conftest import MODELS, photo_crop, png_bytes

NPY = "application/x-npy"


@pytest.fixture(scope="module")
def runtimes(model_repo: Path) -> dict[str, ModelRuntime]:
    return {name: ModelRuntime.load(model_repo / name, device="cpu") for name in MODELS}


@pytest.fixture(scope="module")
def batch(photos: list[Path]) -> np.ndarray:
    return np.stack([photo_crop(p, 32) for p in photos[:5]])  # (5, 32, 32, 3) real photos


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", list(MODELS))
def test_encode_formats_agree_with_runtime(client: httpx.Client, runtimes: dict[str, ModelRuntime], batch: np.ndarray, model: str) -> None:
    expected = runtimes[model].encode(batch)
    files = [("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(batch)]

    r = client.post("/v1/encode", files=files, data={"model": model})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model and body["codebook_size"] == runtimes[model].info.codebook_size
    assert [im["grid"] for im in body["images"]] == [[8, 8]] * len(batch)
    np.testing.assert_array_equal(np.array([im["tokens"] for im in body["images"]]), expected)

    r = client.post("/v1/encode", files=files, params={"model": model}, headers={"Accept": NPY})
    assert r.status_code == 200 and r.headers["content-type"] == NPY
    got = load_npy(r.content)
    assert got.dtype == np.int32 and got.shape == (5, 8, 8)
    np.testing.assert_array_equal(got, expected)
    assert r.headers["x-model"] == model

    b64 = [base64.b64encode(png_bytes(im)).decode() for im in batch]
    r = client.post("/v1/encode", json={"images": b64, "model": model})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.array([im["tokens"] for im in r.json()["images"]]), expected)

    one = client.post("/v1/encode", files=[files[0]], params={"model": model}, headers={"Accept": NPY})
    np.testing.assert_array_equal(load_npy(one.content), expected[:1])


@pytest.mark.parametrize("model", list(MODELS))
def test_decode_formats_agree_with_runtime(client: httpx.Client, runtimes: dict[str, ModelRuntime], batch: np.ndarray, model: str) -> None:
    rt = runtimes[model]
    tokens = rt.encode(batch)
    expected = rt.decode(tokens)  # (5, 32, 32, 3) uint8

    r = client.post("/v1/decode", json={"tokens": tokens.tolist(), "model": model})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["grid"] == [8, 8] and body["size"] == [32, 32] and len(body["images"]) == 5
    pngs = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in body["images"]])
    np.testing.assert_array_equal(pngs, expected)

    r = client.post("/v1/decode", content=npy(tokens), params={"model": model}, headers={"Content-Type": NPY, "Accept": NPY})
    assert r.status_code == 200 and r.headers["content-type"] == NPY
    got = load_npy(r.content)
    assert got.dtype == np.uint8 and got.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(got, expected)

    r = client.post("/v1/decode", json={"tokens": tokens[0].tolist(), "model": model}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected[0])

    # int64 npy bodies and 2-D (one grid) bodies are accepted too
    r = client.post(
        "/v1/decode", content=npy(tokens[1].astype(np.int64)), params={"model": model}, headers={"Content-Type": NPY, "Accept": NPY}
    )
    np.testing.assert_array_equal(load_npy(r.content), expected[1:2])


def test_full_round_trip_through_http_only(client: httpx.Client, batch: np.ndarray) -> None:
    """encode (npy) -> decode (npy) -> encode again: the model's own reconstructions re-encode to a
    grid of the same shape, and every id is in range — a pipeline a client would actually run."""
    files = [("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(batch)]
    tokens = load_npy(client.post("/v1/encode", files=files, headers={"Accept": NPY}).content)
    images = load_npy(client.post("/v1/decode", content=npy(tokens), headers={"Content-Type": NPY, "Accept": NPY}).content)
    assert images.shape == batch.shape
    files2 = [("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
    again = load_npy(client.post("/v1/encode", files=files2, headers={"Accept": NPY}).content)
    assert again.shape == tokens.shape and again.min() >= 0 and again.max() < 1000


def test_resize_modes(client: httpx.Client, runtimes: dict[str, ModelRuntime], photos: list[Path]) -> None:
    jpeg = photos[0].read_bytes()  # a real 256-px JPEG
    r = client.post("/v1/encode", files={"images": ("a.jpg", jpeg, "image/jpeg")}, data={"resize": "crop"})
    assert r.status_code == 200, r.text
    img = r.json()["images"][0]
    assert img["grid"] == [8, 8]  # crop to the native 32×32
    assert img["source_size"] == list(reversed(Image.open(photos[0]).size))

    # pad: 30×22 -> 32×24 with edge replication at bottom/right; the tokens equal the runtime's on that array
    rng = np.random.default_rng(0)
    odd = rng.integers(0, 256, size=(30, 22, 3), dtype=np.uint8)
    r = client.post("/v1/encode", files={"images": ("o.png", png_bytes(odd), "image/png")}, data={"resize": "pad"})
    assert r.status_code == 200, r.text
    img = r.json()["images"][0]
    assert img["grid"] == [8, 6] and img["source_size"] == [30, 22]
    padded = np.pad(odd, ((0, 2), (0, 2), (0, 0)), mode="edge")
    np.testing.assert_array_equal(np.array(img["tokens"]), runtimes["fsq4"].encode(padded[None])[0])

    # none refuses sizes that are not multiples of f
    r = client.post("/v1/encode", files={"images": ("o.png", png_bytes(odd), "image/png")}, data={"resize": "none"})
    assert r.status_code == 422 and "multiples of 4" in r.json()["detail"]


def test_mixed_sizes_in_one_request(client: httpx.Client, runtimes: dict[str, ModelRuntime], batch: np.ndarray) -> None:
    big = np.concatenate([batch[0], batch[1]], axis=1)  # 32×64
    files = [("images", ("a.png", png_bytes(batch[0]), "image/png")), ("images", ("b.png", png_bytes(big), "image/png"))]
    r = client.post("/v1/encode", files=files, data={"resize": "none"})
    assert r.status_code == 200
    grids = r.json()["images"]
    assert [g["grid"] for g in grids] == [[8, 8], [8, 16]]
    np.testing.assert_array_equal(np.array(grids[1]["tokens"]), runtimes["fsq4"].encode(big[None])[0])
    r = client.post("/v1/encode", files=files, data={"resize": "none"}, headers={"Accept": NPY})  # one npy array cannot hold two grids
    assert r.status_code == 406 and "different grids" in r.json()["detail"]


def test_request_id_is_echoed_and_generated(client: httpx.Client) -> None:
    r = client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/nowhere", headers={"X-Request-ID": "bad id with spaces"})
    rid = r.headers["x-request-id"]
    assert rid != "bad id with spaces" and len(rid) == 32 and int(rid, 16) >= 0
    assert r.json()["request_id"] == rid
    assert client.get("/nowhere").headers["x-request-id"] != rid  # a new one each request


def test_models_listing(client: httpx.Client, runtimes: dict[str, ModelRuntime]) -> None:
    body = client.get("/v1/models").json()
    assert body["default_model"] == "fsq4"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == set(MODELS)
    for name, rt in runtimes.items():
        m = by_name[name]
        assert m["ready"] and m["codebook_size"] == rt.info.codebook_size and m["downsample"] == 4
        assert m["manifest_sha256"] == rt.info.manifest_sha256
    assert body["limits"]["max_images_per_request"] == 64
    one = client.get("/v1/models/simvq4").json()
    assert one["codebook_size"] == 1024 and one["quantizer"] == "vq"
    assert json.loads(client.get("/readyz").text)["status"] == "ready"


def photo_451x300(kodak_dir: Path) -> bytes:
    """An ordinary photo size whose sides are not multiples of any f: a Kodak photo resized to 451×300, as a JPEG."""
    buf = io.BytesIO()
    with Image.open(kodak_dir / "kodim05.png") as im:
        im.convert("RGB").resize((451, 300), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_an_ordinary_photo_encodes_with_no_resize_named(client: httpx.Client, runtimes: dict[str, ModelRuntime], kodak_dir: Path) -> None:
    """Issue 29: one resize default, crop, which accepts every readable photo; `/v1/models` and the OpenAPI schema say so."""
    from models.core import pixels

    data = photo_451x300(kodak_dir)
    expected = runtimes["fsq4"].encode(pixels.prepare(data, downsample=4, resolution=32, resize="crop").pixels[None])[0]
    r = client.post("/v1/encode", files={"images": ("p.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    item = r.json()["images"][0]
    assert item["grid"] == [8, 8] and item["source_size"] == [300, 451]
    np.testing.assert_array_equal(np.array(item["tokens"]), expected)
    r = client.post("/v1/encode", json={"images": [base64.b64encode(data).decode()]}, headers={"Accept": NPY})
    assert r.status_code == 200
    np.testing.assert_array_equal(load_npy(r.content)[0], expected)
    r = client.post("/v1/encode", files={"images": ("p.jpg", data, "image/jpeg")}, data={"resize": "none"})
    assert r.status_code == 422  # none is still there, asked for by name

    models = client.get("/v1/models").json()
    assert models["limits"]["default_resize"] == "crop"
    assert all(m["default_resize"] == "crop" for m in models["models"])
    schema = client.get("/openapi.json").json()
    encode = schema["paths"]["/v1/encode"]["post"]
    resize_param = next(p for p in encode["parameters"] if p["name"] == "resize")
    assert "default: the server's default_resize, crop" in resize_param["description"]
    form = encode["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["resize"]
    assert form["enum"][0] == "crop" and "crop" in form["description"]
    body = schema["components"]["schemas"]["EncodeJSONRequest"]["properties"]["resize"]
    assert "crop unless configured otherwise" in body["description"]
