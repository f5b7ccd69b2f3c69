"""LLM sequences through the Python clients (issue 27): `encode_sequences` and `decode_sequence` on
`Client`, `AsyncClient` and `LocalBackend` give the same ids and images as the HTTP answer and the
core layouts; a Layout built by the caller (emu3, with a text tokenizer trained here) works through
all three; an extended Hugging Face tokenizer maps its added tokens to exactly the ids the service
returns; one resize default (crop) accepts an ordinary 451×300 photo everywhere (issue 29)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from clients._base import DecodedSequence
from clients.client import AsyncClient, Client
from clients.errors import InvalidSequenceError, ValidationError
from clients.local import LocalBackend
from models.core.layouts import Layout
from models.core.vocab import extend_tokenizer, read_layout

from .conftest import Server

OFFSET = 40_000
TEXT = [5, 6, 7]


@pytest.fixture(scope="module")
def kodak(kodak_dir: Path) -> list[Path]:
    return sorted(kodak_dir.glob("*.png"))[:3]


@pytest.fixture(scope="module")
def local(model_dir: Path) -> Any:
    with LocalBackend(model_dir, device="cpu") as backend:
        yield backend


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained here on a few captions (no download), as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["a photo of a barn", "red door, blue sky", "8*8 tokens, 16*16 tokens"] * 4, trainer)
    path = tmp_path_factory.mktemp("text") / "tokenizer.json"
    tok.save(str(path))
    return path


def http_sequences(server: Server, photos: list[Path], **fields: Any) -> list[list[int]]:
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in photos]
    r = httpx.post(f"{server.url}/v1/encode", files=files, data={k: str(v) for k, v in fields.items()}, timeout=60)
    assert r.status_code == 200, r.text
    return [im["sequence"] for im in r.json()["images"]]


@pytest.mark.parametrize("name", ["plain", "chameleon", "lumina"])
def test_clients_and_local_backend_give_the_http_sequences(server: Server, local: Any, kodak: list[Path], name: str) -> None:
    expected = http_sequences(server, kodak, layout=name, vocab_offset=OFFSET)
    with Client(server.url) as client:
        for wire in ("npy", "json"):
            got = client.encode_sequences(kodak, layout=name, vocab_offset=OFFSET, wire=wire)  # type: ignore[arg-type]
            assert [s.tolist() for s in got] == expected and all(s.dtype == np.int64 for s in got)
        one = client.encode_sequences(kodak[0], layout=name, vocab_offset=OFFSET)
        assert one.tolist() == expected[0]
        grids = client.encode(kodak)
        layout = local.layout(name, OFFSET)
        assert [layout.to_sequence(g).tolist() for g in grids] == expected

        sequence = TEXT + expected[0] + TEXT + expected[1]
        kw: dict[str, Any] = {"grid": (8, 8)} if name == "plain" else {}
        found = client.decode_sequence(sequence, layout=name, vocab_offset=OFFSET, output="numpy", **kw)
        assert isinstance(found, DecodedSequence) and len(found) == 2 and not found.repaired
        assert [(s.start, s.grid) for s in found.spans] == [(3, (8, 8)), (3 + len(expected[0]) + 3, (8, 8))]
        direct = client.decode(grids[:2], output="numpy")
        for a, b in zip(found.images, direct, strict=True):
            np.testing.assert_array_equal(a, b)
        here = local.decode_sequence(np.asarray(sequence), layout=name, vocab_offset=OFFSET, output="numpy", **kw)
        assert here.spans == found.spans
        for a, b in zip(here.images, direct, strict=True):
            np.testing.assert_array_equal(a, b)
    assert [s.tolist() for s in local.encode_sequences(kodak, layout=name, vocab_offset=OFFSET)] == expected

    async def run() -> None:
        async with AsyncClient(server.url, max_images_per_request=2) as client:  # split into two requests
            got = await client.encode_sequences(kodak, layout=name, vocab_offset=OFFSET)
            assert [s.tolist() for s in got] == expected
            found = await client.decode_sequence(sequence, layout=name, vocab_offset=OFFSET, **kw)
            assert len(found.images) == 2 and isinstance(found.images[0], Image.Image)

    asyncio.run(run())


def test_malformed_sequences_raise_with_span_and_position(server: Server, local: Any, kodak: list[Path]) -> None:
    (s0,) = http_sequences(server, kodak[:1], layout="lumina", vocab_offset=OFFSET)
    truncated = TEXT + s0 + TEXT + s0[:-4]
    with Client(server.url, max_retries=0) as client:
        with pytest.raises(InvalidSequenceError) as remote:
            client.decode_sequence(truncated, layout="lumina", vocab_offset=OFFSET)
        with pytest.raises(InvalidSequenceError) as here:
            local.decode_sequence(truncated, layout="lumina", vocab_offset=OFFSET)
        assert (remote.value.span, remote.value.position) == (here.value.span, here.value.position) == (1, len(truncated))
        assert remote.value.status == 422 and remote.value.detail == here.value.detail and "truncated" in remote.value.detail
        fixed = client.decode_sequence(truncated, layout="lumina", vocab_offset=OFFSET, repair=True)
        assert fixed.repaired and fixed.spans[1].changes and not fixed.spans[0].changes
        assert local.decode_sequence(truncated, layout="lumina", vocab_offset=OFFSET, repair=True).spans == fixed.spans
        for backend in (client, local):
            with pytest.raises(ValidationError, match="text tokenizer"):
                backend.encode_sequences(kodak[0], layout="emu3", vocab_offset=OFFSET)
            with pytest.raises(ValueError, match="carries its own vocab_offset"):
                backend.encode_sequences(kodak[0], layout=Layout("plain", 0, 1000), vocab_offset=3)


def test_emu3_through_a_layout_built_with_the_text_tokenizer(
    server: Server, local: Any, kodak: list[Path], text_tokenizer: Path, tmp_path: Path
) -> None:
    layout = extend_tokenizer(text_tokenizer, tmp_path / "vocab", "emu3", codebook_size=1000, max_grid=16)
    layout = read_layout(tmp_path / "vocab")  # the tokenizer.json beside it gives the size text's ids
    with Client(server.url) as client:
        grids = client.encode(kodak[:2])
        got = client.encode_sequences(kodak[:2], layout=layout)
        assert [s.tolist() for s in got] == [layout.to_sequence(g).tolist() for g in grids]
        assert [s.tolist() for s in local.encode_sequences(kodak[:2], layout=layout)] == [s.tolist() for s in got]
        found = client.decode_sequence([1, 2, *got[0].tolist(), 3, *got[1].tolist()], layout=layout, output="numpy")
        assert [s.grid for s in found.spans] == [(8, 8), (8, 8)]
        np.testing.assert_array_equal(np.stack(found.images), np.stack(client.decode(grids, output="numpy")))
        with pytest.raises(Exception, match="K = 5"):
            client.encode_sequences(kodak[0], layout=Layout("chameleon", 0, 5))


@pytest.mark.parametrize("name", ["chameleon", "lumina"])
def test_extended_tokenizer_maps_its_tokens_to_the_service_ids(
    server: Server, kodak: list[Path], text_tokenizer: Path, tmp_path: Path, name: str
) -> None:
    from tokenizers import Tokenizer

    layout = extend_tokenizer(text_tokenizer, tmp_path, name, codebook_size=1000, max_grid=8)
    extended = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in kodak[:2]]
    r = httpx.post(f"{server.url}/v1/encode", files=files, data={"layout": name, "vocab_offset": str(layout.vocab_offset)}, timeout=60)
    body = r.json()
    assert body["layout"]["special_ids"] == {k: extended.token_to_id(f"<|{k}|>") for k in body["layout"]["special_ids"]}
    for image in body["images"]:
        tokens = [extended.id_to_token(i) for i in image["sequence"]]
        codes = [t for t in tokens if t.startswith("<|img_")]
        assert [int(t[6:11]) for t in codes] == np.asarray(image["tokens"]).ravel().tolist()
        if name == "lumina":
            assert tokens[:3] == ["<|boi|>", "<|h8|>", "<|w8|>"] and tokens[-1] == "<|eoi|>" and tokens.count("<|eol|>") == 8
        else:
            assert tokens[0] == "<|boi|>" and tokens[-1] == "<|eoi|>" and len(tokens) == 66
        text = extended.decode(image["sequence"], skip_special_tokens=False)  # the LLM's text form reads back to the same ids
        assert extended.encode(text, add_special_tokens=False).ids == image["sequence"]


def photo_451x300(kodak_dir: Path) -> bytes:
    buf = io.BytesIO()
    with Image.open(kodak_dir / "kodim05.png") as im:
        im.convert("RGB").resize((451, 300), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_an_ordinary_photo_with_no_resize_named(server: Server, local: Any, runtime: Any, kodak_dir: Path) -> None:
    """Issue 29: crop is the one default of the clients, the local backend and the server."""
    from models.core import pixels

    data = photo_451x300(kodak_dir)
    expected = runtime.encode(pixels.prepare(data, downsample=4, resolution=32, resize="crop").pixels[None])[0]
    with Client(server.url) as client:
        np.testing.assert_array_equal(client.encode(data), expected)
        np.testing.assert_array_equal(client.encode(data, resize=None), expected)  # None: the server's default, crop
        with pytest.raises(ValidationError, match="multiples of 4"):
            client.encode(data, resize="none")
    np.testing.assert_array_equal(local.encode(data), expected)

    async def run() -> np.ndarray:
        async with AsyncClient(server.url) as client:
            return await client.encode(data)

    np.testing.assert_array_equal(asyncio.run(run()), expected)
