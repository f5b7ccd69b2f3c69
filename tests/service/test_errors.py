"""Every refusal answers the right status with an application/problem+json body, and the server keeps
serving afterwards."""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import ServerThread, png_bytes

NPY = "application/x-npy"
GOOD = png_bytes(np.full((32, 32, 3), 128, np.uint8))


def assert_problem(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["type"].startswith("urn:vqtok:problem:") and body["title"] and body["detail"]
    assert body["request_id"] == r.headers["x-request-id"]
    for w in words:
        assert w.lower() in body["detail"].lower(), body["detail"]
    return body  # type: ignore[no-any-return]


def encode_files(client: httpx.Client, data: bytes, **kw: object) -> httpx.Response:
    return client.post("/v1/encode", files={"images": ("x.png", data, "image/png")}, **kw)  # type: ignore[arg-type]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def bomb_png(side: int) -> bytes:
    """A valid greyscale PNG of side×side zero pixels: a few KB that would expand to side² bytes."""
    raw = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def zero_size_png() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")


# --- images ---


def test_truncated_png_is_400(client: httpx.Client) -> None:
    assert_problem(encode_files(client, GOOD[: len(GOOD) // 2]), 400, "images[0]")


def test_garbage_and_empty_are_400(client: httpx.Client) -> None:
    assert_problem(encode_files(client, b"definitely not an image"), 400, "not an image")
    assert_problem(encode_files(client, b""), 400, "empty")


def test_zero_by_zero_image_is_400(client: httpx.Client) -> None:
    assert_problem(encode_files(client, zero_size_png()), 400)


def test_decompression_bomb_is_413_without_expanding(client: httpx.Client) -> None:
    bomb = bomb_png(20_000)  # 400 Mpx of zeros in about 400 KB
    assert len(bomb) < 1_000_000
    r = encode_files(client, bomb)
    assert_problem(r, 413, "pixels")
    assert r.elapsed.total_seconds() < 2  # refused from the header, not after inflating 400 MB
    assert encode_files(client, GOOD).status_code == 200


def test_unsupported_image_format_is_400(client: httpx.Client) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="TIFF")
    assert_problem(encode_files(client, buf.getvalue()), 400, "supported format")


def test_bad_base64_is_400(client: httpx.Client) -> None:
    assert_problem(client.post("/v1/encode", json={"images": ["!!!not base64!!!"]}), 400, "base64")


def test_malformed_json_is_400(client: httpx.Client) -> None:
    assert_problem(client.post("/v1/encode", content=b"{nope", headers={"Content-Type": "application/json"}), 400, "JSON")


# --- media types and negotiation ---


def test_wrong_content_type_is_415(client: httpx.Client) -> None:
    assert_problem(client.post("/v1/encode", content=GOOD, headers={"Content-Type": "image/png"}), 415, "image/png")
    assert_problem(client.post("/v1/decode", content=b"1 2 3", headers={"Content-Type": "text/plain"}), 415)
    assert_problem(client.post("/v1/encode", content=GOOD), 415)


def test_unacceptable_accept_is_406(client: httpx.Client) -> None:
    assert_problem(encode_files(client, GOOD, headers={"Accept": "image/gif"}), 406)
    r = client.post("/v1/decode", json={"tokens": [[[1]], [[2]]]}, headers={"Accept": "image/png"})
    assert_problem(r, 406, "one image")


# --- token ids ---


@pytest.mark.parametrize(
    ("tokens", "words"),
    [
        ([[-1, 0], [0, 0]], ["-1"]),
        ([[0, 0], [0, 1000]], ["1000", "[0, 1000)"]),
        ([[0, 1.5]], ["integers"]),
        ([[True, False]], ["integers"]),
        ([["1", "2"]], ["integers"]),
        ([[1, 2], [3]], ["rectangular"]),
        ([[10**30]], []),
        ([1, 2, 3], ["shape"]),
        ([[[[1]]]], ["shape"]),
    ],
)
def test_invalid_ids_are_422(client: httpx.Client, tokens: object, words: list[str]) -> None:
    assert_problem(client.post("/v1/decode", json={"tokens": tokens}), 422, *words)


def test_mismatched_grid_is_422(client: httpx.Client) -> None:
    assert_problem(client.post("/v1/decode", json={"tokens": [[1, 2, 3], [4, 5, 6]], "grid": [3, 2]}), 422, "grid")


def test_npy_ids_checked(client: httpx.Client) -> None:
    def post(a: np.ndarray) -> httpx.Response:
        buf = io.BytesIO()
        np.save(buf, a)
        return client.post("/v1/decode", content=buf.getvalue(), headers={"Content-Type": NPY})

    assert_problem(post(np.zeros((2, 2), np.float32)), 422, "integers")
    assert_problem(post(np.full((1, 2, 2), 5000, np.int32)), 422, "5000")
    assert_problem(post(np.zeros((0, 2, 2), np.int32)), 422, "shape")
    assert_problem(client.post("/v1/decode", content=b"\x93NUMPY garbage", headers={"Content-Type": NPY}), 400, "npy")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert_problem(client.post("/v1/decode", content=pickled.getvalue(), headers={"Content-Type": NPY}), 400)


def test_schema_errors_are_problem_json(client: httpx.Client) -> None:
    body = assert_problem(client.post("/v1/decode", json={"tokens": [[1]], "extra": 1}), 422)
    assert body["errors"]
    assert_problem(client.post("/v1/encode", json={"images": []}), 422)
    assert_problem(client.post("/v1/encode", files={"images": ("x.png", GOOD, "image/png")}, data={"resize": "stretch"}), 422)


# --- models and routes ---


def test_unknown_model_is_404(client: httpx.Client) -> None:
    assert_problem(encode_files(client, GOOD, params={"model": "nope"}), 404, "nope", "fsq4")
    assert_problem(client.get("/v1/models/nope"), 404)
    assert_problem(client.post("/v1/decode", json={"tokens": [[1]], "model": "nope"}), 404)


def test_unknown_route_and_method_are_problems(client: httpx.Client) -> None:
    assert_problem(client.get("/v2/encode"), 404, "/v2/encode")
    assert_problem(client.get("/v1/encode"), 405)


# --- size limits ---


def test_limits_are_413(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve(max_body_bytes=200_000, max_images_per_request=3, max_image_pixels=64 * 64, max_grid_tokens=100)
    with httpx.Client(base_url=s.url, timeout=30) as c:
        # declared Content-Length over the limit: refused before the body is read
        assert_problem(c.post("/v1/encode", content=b"x" * 300_000, headers={"Content-Type": "application/json"}), 413, "200000")

        # a streamed (chunked) body is counted while it arrives
        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(30):
                yield b"a" * 10_000

        assert_problem(c.post("/v1/encode", content=chunks(), headers={"Content-Type": "application/json"}), 413, "limit")
        files = [("images", (f"{i}.png", GOOD, "image/png")) for i in range(4)]
        assert_problem(c.post("/v1/encode", files=files), 413, "3")
        assert_problem(c.post("/v1/encode", json={"images": ["AAAA"] * 4}), 413, "3")
        assert_problem(encode_files(c, png_bytes(np.zeros((65, 64, 3), np.uint8))), 413, "pixels")
        big = png_bytes(np.zeros((48, 48, 3), np.uint8))  # resize=none: its own size (crop, the default, makes 32×32: 64 tokens)
        assert_problem(c.post("/v1/encode", files={"images": ("x.png", big)}, data={"resize": "none"}), 413, "tokens")  # 12×12 = 144 > 100
        assert_problem(c.post("/v1/decode", json={"tokens": np.zeros((11, 10), int).tolist()}), 413, "110")
        assert_problem(c.post("/v1/decode", json={"tokens": np.zeros((4, 2, 2), int).tolist()}), 413, "4 grids")
        assert encode_files(c, GOOD).status_code == 200  # and the server still serves


# --- API keys ---


def test_api_key_enforced_when_set(serve) -> None:  # type: ignore[no-untyped-def]
    s: ServerThread = serve(api_keys=["secret-key-1", "secret-key-2"])
    with httpx.Client(base_url=s.url, timeout=30) as c:
        r = encode_files(c, GOOD)
        assert_problem(r, 401, "API key")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_problem(c.get("/v1/models", headers={"Authorization": "Bearer wrong-key-0"}), 401)
        assert_problem(c.get("/v1/models", headers={"Authorization": "Basic c2VjcmV0LWtleS0x"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer secret-key-2"}).status_code == 200
        assert encode_files(c, GOOD, headers={"Authorization": "Bearer secret-key-1"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(open_path).status_code == 200, open_path
        # admin uses the API keys when no admin keys are set
        assert_problem(c.post("/v1/admin/reload"), 401)


def test_admin_off_without_keys(client: httpx.Client) -> None:
    assert_problem(client.post("/v1/admin/reload"), 403, "SIGHUP")
