"""Small images are decoded on the event loop, up to `inline_decode_pixels` per request; larger ones,
and every image with inline_decode_pixels=0, in the decode threads. Same tokens and the same errors
either way (a real server, real JPEGs)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from models.core import pixels
from service.routes import encode as encode_route
from tests.helpers import ServerThread
from tests.service.conftest import cpu_settings


def _jpeg(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def threads_seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, str]]]:
    """(image side, thread name) of every `prepare` the encode route runs in this process."""
    seen: list[tuple[int, str]] = []
    real = pixels.prepare

    def spy(data: bytes, **kw: Any) -> pixels.PreparedImage:
        out = real(data, **kw)
        seen.append((int(out.source_size[0]), threading.current_thread().name))
        return out

    monkeypatch.setattr(encode_route.images, "prepare", spy)
    yield seen


def _encode(url: str, files: list[bytes]) -> httpx.Response:
    parts = [("images", (f"{i}.jpg", f, "image/jpeg")) for i, f in enumerate(files)]
    return httpx.post(f"{url}/v1/encode", files=parts, data={"model": "fsq4", "resize": "none"}, timeout=60)


def _serve(model_repo: Path, **overrides: Any) -> ServerThread:
    return ServerThread(cpu_settings(model_repo, **overrides)).start()


def test_small_images_on_the_loop_up_to_the_budget(model_repo: Path, threads_seen: list[tuple[int, str]]) -> None:
    server = _serve(model_repo, inline_decode_pixels=3 * 64 * 64)  # three 64² images per request
    try:
        small = [_jpeg(64, i) for i in range(5)]
        r = _encode(server.url, small)
        assert r.status_code == 200, r.text
        names = [name for _, name in threads_seen]
        assert sum(not n.startswith("images") for n in names) == 3, names  # the budget's worth on the loop
        assert sum(n.startswith("images") for n in names) == 2, names  # the rest in the decode threads
        threads_seen.clear()
        r = _encode(server.url, [_jpeg(128, 9)])  # 128² is over the whole budget: a thread
        assert r.status_code == 200, r.text
        assert [n.startswith("images") for _, n in threads_seen] == [True]
    finally:
        server.stop()


def test_zero_means_always_the_threads_and_the_tokens_do_not_change(model_repo: Path, threads_seen: list[tuple[int, str]]) -> None:
    files = [_jpeg(64, i) for i in range(3)]
    tokens = {}
    for budget in (0, 1 << 20):
        server = _serve(model_repo, inline_decode_pixels=budget)
        try:
            threads_seen.clear()
            r = _encode(server.url, files)
            assert r.status_code == 200, r.text
            tokens[budget] = [im["tokens"] for im in r.json()["images"]]
            on_threads = [n.startswith("images") for _, n in threads_seen]
            assert on_threads == [budget == 0] * 3, threads_seen
        finally:
            server.stop()
    assert tokens[0] == tokens[1 << 20]


def test_bad_images_decoded_on_the_loop_give_the_same_errors(model_repo: Path) -> None:
    answers = {}
    for budget in (0, 1 << 20):
        server = _serve(model_repo, inline_decode_pixels=budget)
        try:
            truncated = _jpeg(64, 1)[:300]  # a readable header, a body cut short
            odd = _jpeg(62, 2)  # 62 is not a multiple of the model's downsample factor (resize none)
            answers[budget] = [(r.status_code, r.json().get("type")) for r in (_encode(server.url, [f]) for f in (truncated, odd))]
        finally:
            server.stop()
    assert answers[0] == answers[1 << 20]
    assert [status for status, _ in answers[0]] == [400, 422], answers
