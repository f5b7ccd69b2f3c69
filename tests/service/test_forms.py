"""The in-memory multipart parser reads what Starlette's `request.form()` reads (the reference: the
same python-multipart underneath, its own bookkeeping), refuses what it refuses, and the encode route
maps its refusals to the right problems."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service import forms

from .conftest import png_bytes
from .test_errors import assert_problem

GOOD = png_bytes(np.full((32, 32, 3), 128, np.uint8))


def body_of(files: object = None, data: dict[str, object] | None = None) -> tuple[bytes, str]:
    """(body, content type) exactly as httpx sends them; fields alone written out by hand (httpx would
    send them url-encoded)."""
    if files:
        request = httpx.Request("POST", "http://x/", files=files, data=data)  # type: ignore[arg-type]
        return request.read(), request.headers["content-type"]
    out = b""
    for name, values in (data or {}).items():
        for value in values if isinstance(values, list) else [values]:
            out += f'--bnd\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    return out + b"--bnd--\r\n", "multipart/form-data; boundary=bnd"


def by_starlette(body: bytes, content_type: str, max_files: int = 1000, max_fields: int = 1000) -> list[tuple[str, str | None, bytes]]:
    async def stream():  # type: ignore[no-untyped-def]
        yield body
        yield b""

    async def run() -> list[tuple[str, str | None, bytes]]:
        parser = MultiPartParser(Headers({"content-type": content_type}), stream(), max_files=max_files, max_fields=max_fields)
        form = await parser.parse()
        out: list[tuple[str, str | None, bytes]] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                out.append((name, value.filename, await value.read()))
            else:
                out.append((name, None, value.encode()))
        return out

    return asyncio.run(run())


def by_ours(body: bytes, content_type: str, max_files: int = 1000, max_fields: int = 1000) -> list[tuple[str, str | None, bytes]]:
    form = forms.parse_form(body, content_type, max_files=max_files, max_fields=max_fields)
    return [(p.name, p.filename, p.data if p.filename is not None else forms._decode(p.data, form.encoding).encode()) for p in form.parts]


def starlette_get(body: bytes, content_type: str, name: str) -> object:
    async def stream():  # type: ignore[no-untyped-def]
        yield body

    async def run() -> object:
        return (await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()).get(name)

    return asyncio.run(run())


CASES = {
    "one image": ({"images": ("a.png", GOOD, "image/png")}, None),
    "three images and fields": (
        [("images", (f"{i}.png", GOOD[: 100 + i], "image/png")) for i in range(3)],
        {"model": "photo", "resize": "crop"},
    ),
    "an empty file": ({"images": ("empty.png", b"", "image/png")}, None),
    "non-ASCII names and a boundary-like payload": (
        {"images": ("naïve ☃.png", b"--boundary\r\n\r\n--" + GOOD, "image/png")},
        {"model": "modèle"},
    ),
    "a field named images": (None, {"images": "not a file"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_well_formed_bodies_read_as_starlette_reads_them(case: str) -> None:
    files, data = CASES[case]
    body, ctype = body_of(files, data)
    assert by_ours(body, ctype) == by_starlette(body, ctype)


def test_a_repeated_field_reads_as_starlettes_form_get_reads_it() -> None:
    """The last part of a name counts, as in Starlette's `form.get` (what the route used before); a
    file part there reads as no field."""
    body, ctype = body_of([("model", ("m.bin", b"x", "application/octet-stream"))], None)
    assert forms.parse_form(body, ctype, max_files=4, max_fields=4).field("model") is None
    body, ctype = body_of(None, {"model": ["first", "second"]})
    assert forms.parse_form(body, ctype, max_files=4, max_fields=4).field("model") == "second" == starlette_get(body, ctype, "model")


@pytest.mark.parametrize("charset", ["utf-8", "latin-1", "rot13", "hex", "base64", "zlib", "undefined", "no-such-codec"])
def test_any_declared_charset_reads_as_starlette_reads_it(charset: str) -> None:
    """A bytes-to-bytes codec or an unknown name as the charset is no reason to fail (it was a 500).
    ("undefined", a codec that refuses everything, fails in Starlette's parser itself: read as latin-1.)"""
    body, ctype = body_of(None, {"model": "modèle", "resize": "crop"})
    reference = by_starlette(body, ctype + f"; charset={'latin-1' if charset == 'undefined' else charset}")
    assert by_ours(body, ctype + f"; charset={charset}") == reference


def test_a_body_fed_in_pieces_reads_as_the_whole() -> None:
    files = [("images", (f"{i}.png", GOOD, "image/png")) for i in range(3)]
    body, ctype = body_of(files, {"model": "m"})
    whole = forms.parse_form(body, ctype, max_files=8, max_fields=8)
    for size in (1, 7, 64, 1000):
        parser = forms.FormParser(ctype, max_files=8, max_fields=8)
        for i in range(0, len(body), size):
            parser.write(body[i : i + size])
        assert parser.finish() == whole


def test_limits_count_files_and_fields_separately() -> None:
    body, ctype = body_of([("images", (f"{i}.png", GOOD, "image/png")) for i in range(3)], {"a": "1", "b": "2"})
    forms.parse_form(body, ctype, max_files=3, max_fields=2)  # exactly at both limits
    with pytest.raises(forms.TooManyFiles, match="files"):
        forms.parse_form(body, ctype, max_files=2, max_fields=2)
    with pytest.raises(forms.FormError, match="fields"):
        forms.parse_form(body, ctype, max_files=3, max_fields=1)
    with pytest.raises(MultiPartException):  # the reference refuses the same
        by_starlette(body, ctype, max_files=2)


MALFORMED = {
    "no boundary": (b"--x\r\n", "multipart/form-data"),
    "a part without a name": (
        b'--b\r\nContent-Disposition: form-data; filename="a.png"\r\n\r\nxx\r\n--b--\r\n',
        "multipart/form-data; boundary=b",
    ),
    "garbage where the boundary belongs": (b"this is not multipart at all", "multipart/form-data; boundary=b"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_are_refused_as_starlette_refuses_them(case: str) -> None:
    body, ctype = MALFORMED[case]
    with pytest.raises(forms.FormError):
        forms.parse_form(body, ctype, max_files=8, max_fields=8)
    with pytest.raises(MultiPartException):
        by_starlette(body, ctype)


def test_a_truncated_body_gives_what_starlette_gives() -> None:
    body, ctype = body_of([("images", (f"{i}.png", GOOD, "image/png")) for i in range(2)], {"model": "m"})
    for cut in (len(body) // 3, len(body) // 2, len(body) - 5):
        try:
            reference = by_starlette(body[:cut], ctype)
        except MultiPartException:
            with pytest.raises(forms.FormError):
                by_ours(body[:cut], ctype)
            continue
        assert by_ours(body[:cut], ctype) == reference


def test_an_oversized_field_is_refused() -> None:
    body, ctype = body_of(None, {"model": "m" * (forms.MAX_FIELD_BYTES + 1)})
    with pytest.raises(forms.FormError, match="KB"):
        forms.parse_form(body, ctype, max_files=1, max_fields=1)


# --- through the encode route ---


def test_encode_refuses_malformed_multipart_with_problems(client: httpx.Client) -> None:
    r = client.post("/v1/encode", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    assert_problem(r, 400, "multipart", "boundary")
    body, _ = MALFORMED["a part without a name"]
    r = client.post("/v1/encode", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert_problem(r, 400, "multipart", "name")
    body, ctype = body_of(None, {"images": "not a file"})
    assert_problem(client.post("/v1/encode", content=body, headers={"Content-Type": ctype}), 422, "filename")
    body, ctype = body_of(None, {f"f{i}": "v" for i in range(17)})
    assert_problem(client.post("/v1/encode", content=body, headers={"Content-Type": ctype}), 400, "fields")
    body, ctype = body_of({"images": ("a.png", GOOD, "image/png")}, {"resize": "crop"})
    r = client.post("/v1/encode", content=body, headers={"Content-Type": ctype + "; charset=rot13"})
    assert r.status_code == 200 and r.json()["images"][0]["grid"]  # a bytes-to-bytes "charset" is no 500
