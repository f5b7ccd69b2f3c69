"""`vqtok tokenize` with a layout (issue 27): the `sequence` column equals the service's answer for the
same images (and LocalBackend's) on every engine; captions through a text tokenizer give `text_ids`
and an interleaved `input_ids`; `--packed` writes a uint32 .bin and a Megatron index that read back
(with numpy alone) to the parquet rows; `--vocab` (emu3 too) and the refusals."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from clients.local import LocalBackend
from clients.tokenize.format import MANIFEST, load_tokens, read_tokens
from clients.tokenize.sequences import read_packed
from models.core.layouts import Layout
from models.core.vocab import extend_tokenizer
from vqtok.cli import main

from .conftest import Server

OFFSET = 30_000
CAPTIONS = ["a red barn in a field", "two boats on the water", "", "a parrot, 8*8 colours", "a hat and a wall"]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory, kodak_dir: Path) -> Path:
    """Five Kodak photos (read in place) with sidecar captions (`kodim01.txt`); the third has none."""
    root = tmp_path_factory.mktemp("captioned")
    for i, p in enumerate(sorted(kodak_dir.glob("*.png"))[:5]):
        (root / p.name).symlink_to(p)
        if CAPTIONS[i]:
            (root / p.with_suffix(".txt").name).write_text(CAPTIONS[i])
    return root


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CAPTIONS * 4, trainer)
    path = tmp_path_factory.mktemp("text") / "tokenizer.json"
    tok.save(str(path))
    return path


def tokenize(*argv: str) -> None:
    assert main(["tokenize", "--no-progress", *argv]) == 0


def rows(out: Path) -> list[dict[str, Any]]:
    return read_tokens(out).to_pylist()  # type: ignore[no-any-return]


def http_sequences(server: Server, files: list[Path], **fields: Any) -> dict[str, list[int]]:
    parts = [("images", (p.name, p.read_bytes(), "image/png")) for p in files]
    r = httpx.post(f"{server.url}/v1/encode", files=parts, data={k: str(v) for k, v in fields.items()}, timeout=60)
    assert r.status_code == 200, r.text
    return {p.name: im["sequence"] for p, im in zip(files, r.json()["images"], strict=True)}


@pytest.mark.parametrize("name", ["plain", "chameleon", "lumina"])
def test_sequence_column_equals_the_service_and_local_backend(
    server: Server, model_dir: Path, captioned: Path, tmp_path: Path, name: str
) -> None:
    images = sorted(captioned.glob("*.png"))
    expected = http_sequences(server, images, layout=name, vocab_offset=OFFSET)
    with LocalBackend(model_dir, device="cpu") as local:
        here = local.encode_sequences(images, layout=name, vocab_offset=OFFSET)
    assert [s.tolist() for s in here] == [expected[p.name] for p in images]
    for engine in ("local", "server"):
        out = tmp_path / engine
        extra = ["--engine", "server", "--server", server.url] if engine == "server" else ["--model", str(model_dir)]
        tokenize("--input", str(captioned), "--output", str(out), "--layout", name, "--vocab-offset", str(OFFSET), *extra)
        got = rows(out)
        assert {r["key"]: r["sequence"] for r in got} == expected, engine
        assert "text_ids" not in got[0] and got[0]["txt"] == CAPTIONS[0]  # the caption is carried, not tokenized
        meta = pq.read_schema(next(out.glob("part-*.parquet"))).metadata
        assert json.loads(meta[b"vqtok.layout"])["name"] == name and json.loads(meta[b"vqtok.sequences"])["vocab_offset"] == OFFSET
        data = load_tokens(out)
        assert [s.tolist() for s in data.sequences["sequence"]] == [expected[k] for k in data.keys] and "sequence" not in data.columns


def test_ray_engine_writes_the_same_sequences(ray_local: Any, model_dir: Path, captioned: Path, tmp_path: Path) -> None:
    args = ["--input", str(captioned), "--model", str(model_dir), "--layout", "lumina", "--vocab-offset", str(OFFSET)]
    tokenize(*args, "--output", str(tmp_path / "local"))
    tokenize(*args, "--output", str(tmp_path / "ray"), "--engine", "ray")
    local, ray = sorted((tmp_path / "local").glob("part-*.parquet")), sorted((tmp_path / "ray").glob("part-*.parquet"))
    assert [f.read_bytes() for f in local] == [f.read_bytes() for f in ray]  # byte-identical shards


@pytest.mark.parametrize("order", ["text-first", "image-first"])
def test_captions_text_ids_input_ids_and_the_packed_form(
    model_dir: Path, captioned: Path, text_tokenizer: Path, tmp_path: Path, order: str
) -> None:
    from tokenizers import Tokenizer

    out = tmp_path / "out"
    tokenize(
        "--input", str(captioned), "--output", str(out), "--model", str(model_dir), "--layout", "lumina",
        "--vocab-offset", str(OFFSET), "--text-tokenizer", str(text_tokenizer), "--caption-column", "txt",
        "--order", order, "--packed", "--shard-size", "2", "--columns", "txt",
    )  # fmt: skip
    tok = Tokenizer.from_file(str(text_tokenizer))
    layout = Layout("lumina", vocab_offset=OFFSET, codebook_size=1000)
    got = rows(out)
    assert [r["key"] for r in got] == [f"kodim0{i}.png" for i in range(1, 6)]
    for r, caption in zip(got, CAPTIONS, strict=True):
        grid = np.asarray(r["tokens"]).reshape(r["grid_h"], r["grid_w"])
        assert r["sequence"] == layout.to_sequence(grid).tolist()
        assert r["text_ids"] == tok.encode(caption, add_special_tokens=False).ids  # a missing caption: []
        both = [r["text_ids"], r["sequence"]] if order == "text-first" else [r["sequence"], r["text_ids"]]
        assert r["input_ids"] == both[0] + both[1]
        assert r["txt"] == (caption or None)

    # the packed files, read as the module docstring says, with numpy alone
    folder = out / "__packed__"
    tokens = np.fromfile(folder / "input_ids.bin", dtype="<u4")
    index = (folder / "input_ids.idx").read_bytes()
    assert index[:9] == b"MMIDIDX\x00\x00" and struct.unpack("<QB", index[9:18]) == (1, 4)
    n, documents = struct.unpack("<QQ", index[18:34])
    assert (n, documents) == (5, 6)
    sizes = np.frombuffer(index, "<i4", n, 34)
    pointers = np.frombuffer(index, "<i8", n, 34 + 4 * n)
    doc = np.frombuffer(index, "<i8", n + 1, 34 + 12 * n)
    assert len(index) == 34 + 12 * n + 8 * (n + 1) and doc.tolist() == list(range(6))
    assert tokens.size == sizes.sum() and pointers.tolist() == (4 * np.concatenate([[0], np.cumsum(sizes)[:-1]])).tolist()
    for r, size, pointer in zip(got, sizes, pointers, strict=True):
        assert tokens[pointer // 4 : pointer // 4 + size].tolist() == r["input_ids"]
    packed = read_packed(out)
    assert len(packed) == 5 and [packed[i].tolist() for i in range(5)] == [r["input_ids"] for r in got]
    record = json.loads((folder / "input_ids.json").read_text())
    assert record["rows"] == 5 and record["column"] == "input_ids" and len(record["shards"]) == 3
    assert not any(p.name.startswith("__") for p in out.glob("*.parquet"))
    assert pq.read_table(out).num_rows == 5  # the dataset reader skips __packed__ and __vqtok__

    # resuming the same job changes nothing and rewrites the same packed bytes; another layout is refused
    before = (folder / "input_ids.bin").read_bytes()
    tokenize(
        "--input", str(captioned), "--output", str(out), "--model", str(model_dir), "--layout", "lumina",
        "--vocab-offset", str(OFFSET), "--text-tokenizer", str(text_tokenizer), "--caption-column", "txt",
        "--order", order, "--packed", "--shard-size", "2", "--columns", "txt",
    )  # fmt: skip
    assert (folder / "input_ids.bin").read_bytes() == before
    code = main(
        ["tokenize", "--no-progress", "--input", str(captioned), "--output", str(out), "--model", str(model_dir), "--shard-size", "2"]
    )
    assert code != 0
    assert json.loads((out / MANIFEST).read_text())["job"]["sequences"]["order"] == order


def test_vocab_file_gives_the_layout_and_emu3_its_size_text(model_dir: Path, captioned: Path, text_tokenizer: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    layout = extend_tokenizer(text_tokenizer, tmp_path / "vocab", "emu3", codebook_size=1000, max_grid=16)
    extended = Tokenizer.from_file(str(tmp_path / "vocab" / "tokenizer.json"))
    out = tmp_path / "out"
    tokenize("--input", str(captioned), "--output", str(out), "--model", str(model_dir), "--vocab", str(tmp_path / "vocab" / "vqtok_vocab.json"),
             "--caption-column", "txt", "--packed")  # fmt: skip
    for r, caption in zip(rows(out), CAPTIONS, strict=True):
        tokens = [extended.id_to_token(i) for i in r["sequence"]]
        assert tokens[0] == "<|boi|>" and extended.decode(r["sequence"][1 : tokens.index("<|img|>")]) == "8*8"
        assert r["text_ids"] == extended.encode(caption, add_special_tokens=False).ids  # the extended tokenizer beside the vocab
        assert r["input_ids"] == r["text_ids"] + r["sequence"]
        assert r["sequence"][-2:] == [layout.special_id("eof"), layout.special_id("eoi")]
    assert [p.tolist() for p in (read_packed(out)[i] for i in range(5))] == [r["input_ids"] for r in rows(out)]


def test_refusals_name_what_is_missing(
    model_dir: Path, captioned: Path, text_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["tokenize", "--no-progress", "--input", str(captioned), "--model", str(model_dir)]
    cases = [
        (["--packed"], "need a layout"),
        (["--layout", "lumina", "--caption-column", "txt"], "needs a text tokenizer"),
        (["--layout", "lumina", "--text-tokenizer", str(text_tokenizer)], "--caption-column"),
        (["--layout", "lumina", "--text-tokenizer", str(text_tokenizer), "--caption-column", "nope"], "caption column 'nope'"),
        (["--layout", "emu3"], "--text-tokenizer"),
        (["--vocab", str(tmp_path)], "no such file"),
    ]
    for i, (extra, words) in enumerate(cases):
        assert main([*base, "--output", str(tmp_path / f"o{i}"), *extra]) != 0, extra
        assert words in capsys.readouterr().err, extra
