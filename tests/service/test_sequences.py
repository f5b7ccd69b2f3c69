"""Layouts over HTTP (issue 27): `POST /v1/encode` with `layout` answers each image's LLM sequence,
`POST /v1/decode` with a `sequence` finds, checks and decodes every image span in it. Real Kodak
photos, real exported graphs; single-process and split servers."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from models.core.layouts import Layout, grid_side_limit
from tests.service.conftest import metric_value

NPY = "application/x-npy"
LAYOUTS = ("plain", "chameleon", "lumina")
OFFSET = 50_000  # an LLM with a 50k text vocabulary
TEXT_A, TEXT_B, TEXT_C = [11, 12, 13], [21, 22], [31, 32, 33, 34]  # text ids around the images (all below OFFSET)


@pytest.fixture(scope="module")
def kodak(kodak_dir: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(kodak_dir.glob("*.png"))[:4]]


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # type: ignore[no-any-return]


def png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def encode(client: httpx.Client, photos: list[tuple[str, bytes]], **fields: Any) -> dict[str, Any]:
    files = [("images", (name, data, "image/png")) for name, data in photos]
    r = client.post("/v1/encode", files=files, data={k: str(v) for k, v in fields.items()})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def decode_tokens(client: httpx.Client, grids: np.ndarray) -> np.ndarray:
    r = client.post("/v1/decode", json={"tokens": grids.tolist()}, headers={"Accept": NPY})
    assert r.status_code == 200, r.text
    return load_npy(r.content)


def layout_of(client: httpx.Client, name: str, offset: int = OFFSET) -> Layout:
    card = client.get("/v1/models/fsq4").json()
    return Layout(name, vocab_offset=offset, codebook_size=card["codebook_size"], max_grid=card["layout_max_grid"])


@pytest.mark.parametrize("name", LAYOUTS)
def test_encode_sequence_decode_round_trip_on_kodak(client: httpx.Client, kodak: list[tuple[str, bytes]], name: str) -> None:
    body = encode(client, kodak, layout=name, vocab_offset=OFFSET)
    grids = np.array([im["tokens"] for im in body["images"]])
    layout = layout_of(client, name)
    assert body["layout"]["name"] == name and body["layout"]["vocab_offset"] == OFFSET
    assert body["layout"]["image_ids"] == [OFFSET, OFFSET + body["codebook_size"]]
    assert body["layout"]["special_ids"] == {
        n: layout.special_id(n) for n in {"plain": [], "chameleon": ["boi", "eoi"], "lumina": ["boi", "eoi", "eol", "h1", "w1"]}[name]
    }
    for im, grid in zip(body["images"], grids, strict=True):
        assert im["sequence"] == layout.to_sequence(grid).tolist()
        assert min(im["sequence"]) >= OFFSET

    # an LLM's output: text, image, text, image, text
    sequence = TEXT_A + body["images"][0]["sequence"] + TEXT_B + body["images"][1]["sequence"] + TEXT_C
    request: dict[str, Any] = {"sequence": sequence, "layout": name, "vocab_offset": OFFSET}
    if name == "plain":
        request["grid"] = list(grids.shape[1:])
    r = client.post("/v1/decode", json=request)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["repaired"] is False and len(answer["images"]) == 2
    n0 = len(body["images"][0]["sequence"])
    start1 = len(TEXT_A) + n0 + len(TEXT_B)
    assert [(s["start"], s["end"]) for s in answer["spans"]] == [(len(TEXT_A), len(TEXT_A) + n0), (start1, start1 + n0)]
    assert all(s["grid"] == [8, 8] and s["size"] == [32, 32] and s["changes"] == [] for s in answer["spans"])
    expected = decode_tokens(client, grids[:2])  # the same grids through the token route
    for got, want in zip(answer["images"], expected, strict=True):
        np.testing.assert_array_equal(png(got), want)

    # npy: every span one size
    r = client.post("/v1/decode", json=request, headers={"Accept": NPY})
    assert r.status_code == 200 and r.headers["x-spans"] == "2"
    np.testing.assert_array_equal(load_npy(r.content), expected)
    # one span: a PNG
    one = dict(request, sequence=TEXT_A + body["images"][2]["sequence"])
    r = client.post("/v1/decode", json=one, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")), decode_tokens(client, grids[2:3])[0])
    # two spans cannot be one PNG
    r = client.post("/v1/decode", json=request, headers={"Accept": "image/png"})
    assert r.status_code == 406, r.text


def test_layout_fields_by_json_and_query_and_npy_answer(client: httpx.Client, kodak: list[tuple[str, bytes]]) -> None:
    images = [base64.b64encode(data).decode() for _, data in kodak[:2]]
    r = client.post("/v1/encode", json={"images": images, "layout": "chameleon", "vocab_offset": 7})
    assert r.status_code == 200, r.text
    by_json = [im["sequence"] for im in r.json()["images"]]
    files = [("images", (n, d, "image/png")) for n, d in kodak[:2]]
    r = client.post("/v1/encode", files=files, params={"layout": "chameleon", "vocab_offset": 7})
    assert [im["sequence"] for im in r.json()["images"]] == by_json
    r = client.post("/v1/encode", files=files, params={"layout": "chameleon", "vocab_offset": 7}, headers={"Accept": NPY})
    assert r.status_code == 200 and r.headers["x-layout"] == "chameleon" and r.headers["x-vocab-offset"] == "7"
    got = load_npy(r.content)
    assert got.dtype == np.int32 and got.tolist() == by_json
    assert got[0, 0] == 7 + 1000 and got[0, -1] == 7 + 1001  # boi, eoi after K = 1000 codes


def test_layout_max_grid_is_the_services_longest_grid_side(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()
    limits = models["limits"]
    assert limits["default_resize"] == "crop"
    card = next(m for m in models["models"] if m["name"] == "fsq4")
    assert card["layout_max_grid"] == grid_side_limit(limits["max_grid_tokens"], limits["max_image_pixels"], card["downsample"])
    assert card["layout_max_grid"] == 128 * 128  # the defaults: 128² tokens, 4096² pixels at f = 4
    r = client.post("/v1/decode", json={"sequence": [1], "layout": "lumina", "max_grid": 128 * 128 + 1})
    assert r.status_code == 422 and "largest grid side" in r.json()["detail"]


def test_two_grid_sizes_in_one_sequence(client: httpx.Client, kodak: list[tuple[str, bytes]]) -> None:
    """lumina spans carry their size: a portrait and a landscape grid in one sequence."""

    def part(index: int, h: int, w: int) -> tuple[str, bytes]:  # a piece of a Kodak photo, h×w pixels
        buf = io.BytesIO()
        Image.fromarray(np.asarray(Image.open(io.BytesIO(kodak[index][1])).convert("RGB"))[100 : 100 + h, 200 : 200 + w]).save(buf, "PNG")
        return f"{index}.png", buf.getvalue()

    a = encode(client, [part(0, 30, 63)], layout="lumina", vocab_offset=OFFSET, resize="pad")["images"][0]
    b = encode(client, [part(1, 48, 24)], layout="lumina", vocab_offset=OFFSET, resize="none")["images"][0]
    assert a["grid"] == [8, 16] and b["grid"] == [12, 6]
    r = client.post("/v1/decode", json={"sequence": a["sequence"] + TEXT_B + b["sequence"], "layout": "lumina", "vocab_offset": OFFSET})
    assert r.status_code == 200, r.text
    spans = r.json()["spans"]
    assert [s["grid"] for s in spans] == [a["grid"], b["grid"]] and spans[1]["size"] == [48, 24]
    r = client.post(
        "/v1/decode",
        json={"sequence": a["sequence"] + b["sequence"], "layout": "lumina", "vocab_offset": OFFSET},
        headers={"Accept": NPY},
    )
    assert r.status_code == 406 and "2 grid sizes" in r.json()["detail"]


def _spans(client: httpx.Client, name: str, kodak: list[tuple[str, bytes]]) -> tuple[Layout, list[int], list[int]]:
    body = encode(client, kodak[:2], layout=name, vocab_offset=OFFSET)
    return layout_of(client, name), body["images"][0]["sequence"], body["images"][1]["sequence"]


def _malformed(layout: Layout, s0: list[int], s1: list[int]) -> dict[str, tuple[list[int], int, int, str]]:
    """case -> (sequence, span, position, words in the detail)."""
    _boi, eoi = layout.special_id("boi"), layout.special_id("eoi")
    text = TEXT_A
    first = len(text) + len(s0) + len(TEXT_B)  # where the second span starts
    base = text + s0 + TEXT_B
    cases = {
        "truncated": (base + s1[:-5], 1, first + len(s1) - 5, "truncated"),
        "no eoi before the next boi": (text + s0[:-1] + TEXT_B + s1, 0, first - 1, "no eoi before the next boi"),
        "eoi without boi": ([*base, eoi, *s1], 1, first, "without a boi"),
        "image id outside a span": ([*base, OFFSET + 5, *s1], 1, first, "outside any image span"),
        "text inside a span": (base + s1[:5] + [3] + s1[6:], 1, first + 5, "not image ids"),
    }
    if layout.name == "lumina":
        eol = layout.special_id("eol")
        row = s1.index(eol)  # the first row's end: drop one image id from that row
        cases["ragged row"] = (base + s1[: row - 1] + s1[row:], 1, first + 3, "row 0 has 7 ids")
        cases["bad size token"] = (base + s1[:1] + [OFFSET] + s1[2:], 1, first + 1, "expected a height token")
    if layout.name == "chameleon":
        cases["not a square"] = (base + s1[:-2] + [eoi], 1, first + len(s1) - 2, "not a square grid")
    return cases


@pytest.mark.parametrize("name", ["chameleon", "lumina"])
def test_malformed_sequences_are_422_with_span_and_position(client: httpx.Client, kodak: list[tuple[str, bytes]], name: str) -> None:
    layout, s0, s1 = _spans(client, name, kodak)
    for case, (sequence, span, position, words) in _malformed(layout, s0, s1).items():
        r = client.post("/v1/decode", json={"sequence": sequence, "layout": name, "vocab_offset": OFFSET})
        assert r.status_code == 422, (case, r.text)
        problem = r.json()
        assert r.headers["content-type"].startswith("application/problem+json")
        assert problem["type"] == "urn:vqtok:problem:invalid-sequence", (case, problem)
        assert (problem["span"], problem["position"]) == (span, position), (case, problem)
        assert words in problem["detail"] and f"position {position}" in problem["detail"], (case, problem)
    # the server keeps serving
    r = client.post("/v1/decode", json={"sequence": TEXT_A + s0, "layout": name, "vocab_offset": OFFSET})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_plain_sequences_need_the_grid_and_whole_grids(client: httpx.Client, kodak: list[tuple[str, bytes]]) -> None:
    _, s0, s1 = _spans(client, "plain", kodak)
    r = client.post("/v1/decode", json={"sequence": s0, "layout": "plain", "vocab_offset": OFFSET})
    assert r.status_code == 422 and "needs the grid" in r.json()["detail"]
    r = client.post("/v1/decode", json={"sequence": TEXT_A + s0 + s1[:-3], "layout": "plain", "vocab_offset": OFFSET, "grid": [8, 8]})
    problem = r.json()
    assert r.status_code == 422 and problem["type"].endswith("invalid-sequence") and (problem["span"], problem["position"]) == (1, 67)


@pytest.mark.parametrize("name", ["chameleon", "lumina"])
def test_repair_says_what_it_changed(client: httpx.Client, kodak: list[tuple[str, bytes]], name: str) -> None:
    _layout, s0, s1 = _spans(client, name, kodak)
    truncated = TEXT_A + s0 + TEXT_B + s1[:-5]
    request: dict[str, Any] = {"sequence": truncated, "layout": name, "vocab_offset": OFFSET, "repair": True}
    if name == "chameleon":  # chameleon spans do not declare their size: a cut one is not a square, repair needs the grid
        r = client.post("/v1/decode", json=request)
        assert r.status_code == 422 and "not a square grid (give the grid" in r.json()["detail"]
        request["grid"] = [8, 8]
    r = client.post("/v1/decode", json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["repaired"] is True and r.headers["x-repaired"] == "true"
    assert body["spans"][0]["changes"] == [] and any("truncated" in c for c in body["spans"][1]["changes"])
    assert len(body["images"]) == 2 and body["spans"][1]["grid"] == [8, 8]


def test_emu3_and_bad_layout_requests(client: httpx.Client, kodak: list[tuple[str, bytes]]) -> None:
    files = [("images", (n, d, "image/png")) for n, d in kodak[:1]]
    r = client.post("/v1/encode", files=files, data={"layout": "emu3", "vocab_offset": "100"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "text tokenizer" in detail and "encode_sequences" in detail and "vqtok tokenize --layout emu3 --text-tokenizer" in detail
    r = client.post("/v1/decode", json={"sequence": [1, 2], "layout": "emu3"})
    assert r.status_code == 422 and "decode_sequence" in r.json()["detail"]
    for data, words in (
        ({"layout": "llava"}, "layout must be one of"),
        ({"layout": "plain", "vocab_offset": "x"}, "vocab_offset must be an integer"),
        ({"layout": "plain", "vocab_offset": "-1"}, "vocab_offset must be between"),
        ({"layout": "lumina", "vocab_offset": str(2**31 - 10)}, "over 2147483647"),
    ):
        r = client.post("/v1/encode", files=files, data=data)
        assert r.status_code == 422 and words in r.json()["detail"], (data, r.text)
    r = client.post("/v1/decode", json={"sequence": [1.5], "layout": "plain"})
    assert r.status_code == 422
    r = client.post("/v1/decode", json={"sequence": [1], "layout": "plain", "tokens": [[1]]})
    assert r.status_code == 422  # one or the other
    r = client.post("/v1/decode", json={"sequence": TEXT_A, "layout": "chameleon", "vocab_offset": OFFSET})
    assert r.status_code == 200 and r.json()["images"] == [] and r.json()["spans"] == []  # text only: no image


@pytest.mark.parametrize("name", LAYOUTS)
def test_mutated_sequences_never_answer_5xx(client: httpx.Client, kodak: list[tuple[str, bytes]], name: str) -> None:
    """Valid outputs with ids dropped, inserted or replaced at random (layout ids and text ids), strict
    and with repair: every answer is 200 or a 4xx problem, never a server error."""
    layout, s0, s1 = _spans(client, name, kodak)
    specials = list(layout.special_ids().values())[:8] if name != "plain" else []
    rng = np.random.default_rng(len(name))
    statuses: dict[int, int] = {}
    for trial in range(24):
        seq = TEXT_A + s0 + TEXT_B + s1
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(seq)))
            choice = int(rng.integers(0, 3))
            new = int(rng.choice([*specials, OFFSET + int(rng.integers(0, 1000)), int(rng.integers(0, OFFSET)), 2**40, -5]))
            if choice == 0:
                del seq[at]
            elif choice == 1:
                seq.insert(at, new)
            else:
                seq[at] = new
        body: dict[str, Any] = {"sequence": seq, "layout": name, "vocab_offset": OFFSET, "repair": bool(trial % 2)}
        if name == "plain":
            body["grid"] = [8, 8]
        r = client.post("/v1/decode", json=body)
        assert r.status_code < 500, r.text
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert client.post("/v1/decode", json={"sequence": s0, "layout": name, "vocab_offset": OFFSET, "grid": [8, 8]}).status_code == 200
    assert set(statuses) <= {200, 413, 422}, statuses


def test_a_grid_past_the_requests_max_grid_is_refused_before_encoding(client: httpx.Client, kodak: list[tuple[str, bytes]]) -> None:
    """max_grid below the image's grid side: 422 naming the grid, and the model never ran (the batch counter stands)."""
    name, data = kodak[0]

    def batches() -> float:
        return metric_value(client.get("/metrics").text, "vqtok_batch_size_count", model="fsq4", op="encode")

    before = batches()
    r = client.post("/v1/encode", params={"layout": "lumina", "max_grid": 2}, files={"images": (name, data)})
    assert r.status_code == 422 and "max_grid" in r.json()["detail"], r.text
    assert batches() == before
