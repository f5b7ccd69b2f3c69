"""What a newcomer meets with `vqtok tokenize`: the defaults (the shipped model, resize crop) tokenize
every readable photo of a folder of ordinary sizes, and what is not tokenized is counted as unreadable
or refused; labels, captions and other fields of the input travel with the tokens (parquet columns,
webdataset members, sidecar files) on both engines; the output folder opens as a dataset in pyarrow,
pandas and Hugging Face `datasets`; `load_tokens` gives numpy grids; an output begun with the old layout
(manifest.json / errors.jsonl beside the shards) is resumed."""

from __future__ import annotations

import inspect
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clients.tokenize import commands as tokenize_commands
from clients.tokenize.encoders import RuntimeEncoder
from clients.tokenize.format import DEFAULT_MAX_TOKENS, DEFAULT_RESIZE, ERRORS, JOB_DIR, MANIFEST, TokenizeError, load_tokens, read_tokens
from clients.tokenize.job import JobRun
from clients.tokenize.local import tokenize_local
from clients.tokenize.ray import tokenize_ray
from models.core.artefacts import DEFAULT_MODEL
from models.core.errors import SourceError

# ---------------------------------------------------------------- inputs
# (name, source, (width, height)): ordinary photo sizes; the first eight are not multiples of 8
AWKWARD = [
    ("beach-451x300.jpg", "kodim01.png", (451, 300)),
    ("door-741x500.jpg", "kodim02.png", (741, 500)),
    ("hats-640x427.jpg", "kodim03.png", (640, 427)),
    ("girl-1411x1411.jpg", "kodim04.png", (1411, 1411)),
    ("motor-500x375.png", "kodim05.png", (500, 375)),
    ("boat-333x500.jpg", "kodim06.png", (333, 500)),
    ("flowers-1024x683.webp", "kodim07.png", (1024, 683)),
    ("window-299x299.jpg", "kodim09.png", (299, 299)),
    ("lighthouse-800x600.jpg", "kodim19.png", (800, 600)),
]
TOO_LARGE_FOR_NONE = ("sails-2400x2048.jpg", "kodim10.png", (2400, 2048))  # 300×256 tokens at f=8: over 256²


def make_awkward_folder(root: Path, kodak: Path, photos: Path) -> Path:
    """12 real photos at ordinary sizes (8 with sides that are not multiples of 8), one too large for
    resize none at f=8, and one truncated JPEG."""
    root.mkdir(parents=True, exist_ok=True)
    for name, src, size in [*AWKWARD, TOO_LARGE_FOR_NONE]:
        with Image.open(kodak / src) as im:
            fitted = im.convert("RGB")
            scale = max(size[0] / fitted.width, size[1] / fitted.height)
            fitted = fitted.resize((round(fitted.width * scale + 0.5), round(fitted.height * scale + 0.5)), Image.Resampling.BICUBIC)
            left, top = (fitted.width - size[0]) // 2, (fitted.height - size[1]) // 2
            fitted.crop((left, top, left + size[0], top + size[1])).save(root / name, quality=90)
    shutil.copy(kodak / "kodim08.png", root / "kodim08-768x512.png")
    for p in sorted(photos.glob("*.jpg"))[:2]:
        shutil.copy(p, root / f"val-{p.name}")  # 256×256
    (root / "corrupt.jpg").write_bytes((root / "beach-451x300.jpg").read_bytes()[:700])
    return root


@pytest.fixture(scope="module")
def awkward(tmp_path_factory: pytest.TempPathFactory, kodak_dir: Path, photos_val_dir: Path) -> Path:
    return make_awkward_folder(tmp_path_factory.mktemp("photos"), kodak_dir, photos_val_dir)


@pytest.fixture(scope="module")
def cifar40(tmp_path_factory: pytest.TempPathFactory, cifar_test_parquet: Path) -> Path:
    """The first 40 rows of the CIFAR-10 test shard: HF `image` struct, `label` int64, `classes` metadata."""
    path = tmp_path_factory.mktemp("cifar") / "test-40.parquet"
    pq.write_table(pq.read_table(cifar_test_parquet).slice(0, 40), path)
    return path


@pytest.fixture(scope="module")
def wds(tmp_path_factory: pytest.TempPathFactory, photos_val_dir: Path) -> Path:
    """Two webdataset shards: each sample has .jpg, .cls, .txt and .json members (one lacks .txt,
    one has its .cls before its image); a member-only key with no image is not a sample."""
    root = tmp_path_factory.mktemp("wds")
    photos = sorted(photos_val_dir.glob("*.jpg"))[:6]

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    for n, group in enumerate([photos[:3], photos[3:]]):
        with tarfile.open(root / f"shard-{n:03d}.tar", "w") as tf:
            for i, p in enumerate(group):
                key = f"s{n}{i}"
                if i == 1:
                    add(tf, f"{key}.cls", f"{n * 3 + i}\n".encode())
                add(tf, f"{key}.jpg", p.read_bytes())
                if i != 1:
                    add(tf, f"{key}.cls", f"{n * 3 + i}\n".encode())
                if (n, i) != (1, 2):
                    add(tf, f"{key}.txt", f"a photo, sample {key} ✓".encode())
                add(tf, f"{key}.json", json.dumps({"sample": key, "n": i}).encode())
            add(tf, "orphan.txt", b"no image in this sample")
    return root


def wds_expected() -> dict[str, dict[str, Any]]:
    out = {}
    for n in range(2):
        for i in range(3):
            key = f"s{n}{i}"
            out[f"shard-{n:03d}.tar/{key}"] = {
                "cls": n * 3 + i,
                "txt": None if (n, i) == (1, 2) else f"a photo, sample {key} ✓",
                "json": json.dumps({"sample": key, "n": i}),
            }
    return out


def errors_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / ERRORS).read_text().splitlines()]


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


# ---------------------------------------------------------------- defaults
def test_the_defaults_agree_everywhere() -> None:
    assert DEFAULT_RESIZE == tokenize_commands.DEFAULT_RESIZE == "crop" and DEFAULT_MAX_TOKENS == tokenize_commands.DEFAULT_MAX_TOKENS
    for fn in (tokenize_local, tokenize_ray):
        params = inspect.signature(fn).parameters
        assert params["resize"].default == "crop" and params["columns"].default is None, fn
    assert MANIFEST.startswith(JOB_DIR + "/") and ERRORS.startswith(JOB_DIR + "/")


def test_defaults_tokenize_every_readable_photo_and_none_refuses_the_rest(
    awkward: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vqtok tokenize --input photos/ --output out/`: no --model, no --resize."""
    from vqtok.cli import main

    out = tmp_path / "out"
    assert main(["tokenize", "--input", str(awkward), "--output", str(out), "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert "13 images tokenized, 1 unreadable, 0 refused" in line and str(out / ERRORS) in line
    tokens = load_tokens(out)
    assert len(tokens) == 13 and "corrupt.jpg" not in tokens.keys
    assert tokens.stacked().shape == (13, 32, 32)  # 256² crops of the default f=8 model: one sequence length
    assert tokens.metadata["vqtok.model"] == DEFAULT_MODEL and tokens.metadata["vqtok.resize"] == "crop"
    sizes = dict(zip(tokens.keys, map(tuple, tokens.source_sizes.tolist()), strict=True))
    assert sizes["girl-1411x1411.jpg"] == (1411, 1411) and sizes["door-741x500.jpg"] == (500, 741)
    assert [(e["key"], e["kind"]) for e in errors_of(out)] == [("corrupt.jpg", "unreadable")]

    strict = tmp_path / "strict"
    assert main(["tokenize", "--input", str(awkward), "--output", str(strict), "--resize", "none", "--no-progress"]) == 0
    assert "4 images tokenized, 1 unreadable, 9 refused" in capsys.readouterr().out
    errors = {e["key"]: e for e in errors_of(strict)}
    assert errors.pop("corrupt.jpg")["kind"] == "unreadable"
    assert all(e["kind"] == "refused" for e in errors.values())
    assert {k for k, e in errors.items() if e["reason"].startswith("ImageShapeError")} == {name for name, _, _ in AWKWARD[:8]}
    assert (
        errors[TOO_LARGE_FOR_NONE[0]]["reason"].startswith("ImageTooLarge")
        and str(DEFAULT_MAX_TOKENS) in errors[TOO_LARGE_FOR_NONE[0]]["reason"]
    )
    grids = {r["key"]: (r["grid_h"], r["grid_w"]) for r in read_tokens(strict).to_pylist()}
    assert grids["kodim08-768x512.png"] == (64, 96) and grids["lighthouse-800x600.jpg"] == (75, 100)


def test_summary_counts_unreadable_and_refused_apart(awkward: Path, runtime: Any, tmp_path: Path) -> None:
    s = tokenize_local(awkward, tmp_path / "o", RuntimeEncoder(runtime), resize="pad", max_tokens=25_000, shard_size=5, progress=False)
    # the tiny model has f=4: under pad, 1411² (353² tokens), 2400×2048 (600×512), 1024×683 (256×171) and
    # 800×600 (200×150) are over 25,000 tokens; 768×512 (192×128 = 24,576) is not
    assert (s.images, s.unreadable, s.refused, s.errors) == (9, 1, 4, 5)
    assert {e["key"] for e in errors_of(tmp_path / "o") if e["kind"] == "refused"} == {
        "girl-1411x1411.jpg",
        TOO_LARGE_FOR_NONE[0],
        "flowers-1024x683.webp",
        "lighthouse-800x600.jpg",
    }


# ---------------------------------------------------------------- carried columns
def test_parquet_labels_travel_with_the_tokens(cifar40: Path, runtime: Any, tmp_path: Path) -> None:
    s = tokenize_local(cifar40, tmp_path / "o", RuntimeEncoder(runtime), shard_size=16, batch_size=8, progress=False)
    assert (s.images, s.errors) == (40, 0)
    source = pq.read_table(cifar40)
    table = read_tokens(tmp_path / "o")
    assert table.schema.field("label").type == pa.int64()
    assert table.column("label").to_pylist() == source.column("label").to_pylist()
    classes = source.schema.metadata[b"classes"]
    for shard in sorted((tmp_path / "o").glob("part-*.parquet")):
        assert pq.read_schema(shard).metadata[b"classes"] == classes
    tokens = load_tokens(tmp_path / "o")
    assert tokens.columns["label"].dtype == np.int64 and tokens.classes == classes.decode().split(",")
    np.testing.assert_array_equal(tokens.columns["label"], source.column("label").to_numpy())
    assert tokens[3]["label"] == source.column("label")[3].as_py() and tokens[3]["grid"].shape == (8, 8)
    assert json.loads((tmp_path / "o" / MANIFEST).read_text())["job"]["columns"] == ["label"]

    # a resume with other columns is another job; --no-columns writes tokens only
    with pytest.raises(TokenizeError, match="different job"):
        tokenize_local(cifar40, tmp_path / "o", RuntimeEncoder(runtime), columns=(), shard_size=16, progress=False)
    tokenize_local(cifar40, tmp_path / "bare", RuntimeEncoder(runtime), columns=(), shard_size=16, progress=False)
    assert read_tokens(tmp_path / "bare").schema.names == ["key", "index", "tokens", "grid_h", "grid_w", "source_h", "source_w"]
    with pytest.raises(SourceError, match=r"no column 'caption'.*it has: label"):
        tokenize_local(cifar40, tmp_path / "x", RuntimeEncoder(runtime), columns=["caption"], progress=False)


def test_other_parquet_columns_keep_their_types_and_hf_features(cifar40: Path, runtime: Any, tmp_path: Path) -> None:
    """Any column besides the image travels, in its arrow type; a name the output already uses is
    prefixed; Hugging Face `datasets` features are cut to the carried columns; pandas' are dropped."""
    src = pq.read_table(cifar40).slice(0, 12)
    hf = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": ["a", "b"], "_type": "ClassLabel"}}}}
    table = pa.table(
        {
            "image": src.column("image"),
            "label": src.column("label"),
            "caption": [f"photo {i}" if i % 5 else None for i in range(12)],
            "key": [f"id-{i}" for i in range(12)],
            "scores": [[float(i), 0.5] for i in range(12)],
        }
    ).replace_schema_metadata({"huggingface": json.dumps(hf), "pandas": "{}", "classes": "a,b"})
    pq.write_table(table, tmp_path / "in.parquet")
    tokenize_local(tmp_path / "in.parquet", tmp_path / "o", RuntimeEncoder(runtime), columns=["caption", "key", "scores"], progress=False)
    out = read_tokens(tmp_path / "o")
    assert out.schema.names[7:] == ["caption", "input_key", "scores"]
    assert out.schema.field("scores").type == pa.list_(pa.float64())
    assert out.column("caption").to_pylist() == table.column("caption").to_pylist()
    assert out.column("input_key").to_pylist() == [f"id-{i}" for i in range(12)]
    assert out.column("key").to_pylist()[0] == "in.parquet:0"
    meta = pq.read_schema(next((tmp_path / "o").glob("part-*.parquet"))).metadata
    assert b"pandas" not in meta and meta[b"classes"] == b"a,b" and b"huggingface" not in meta  # no carried column has features

    tokenize_local(tmp_path / "in.parquet", tmp_path / "all", RuntimeEncoder(runtime), progress=False)
    meta = pq.read_schema(next((tmp_path / "all").glob("part-*.parquet"))).metadata
    assert json.loads(meta[b"huggingface"]) == {"info": {"features": {"label": hf["info"]["features"]["label"]}}}
    assert read_tokens(tmp_path / "all").schema.names[7:] == ["label", "caption", "input_key", "scores"]


def test_webdataset_members_and_folder_sidecars_travel(wds: Path, photos_val_dir: Path, runtime: Any, tmp_path: Path) -> None:
    tokenize_local(wds, tmp_path / "wds", RuntimeEncoder(runtime), shard_size=4, batch_size=2, progress=False)
    table = read_tokens(tmp_path / "wds")
    assert table.schema.names[7:] == ["cls", "json", "txt"]
    assert [table.schema.field(c).type for c in ("cls", "json", "txt")] == [pa.int64(), pa.string(), pa.string()]
    rows = {r["key"]: {c: r[c] for c in ("cls", "json", "txt")} for r in table.to_pylist()}
    assert rows == wds_expected()

    # one .cls that is not an integer: the column is text; only the asked-for columns travel
    with tarfile.open(tmp_path / "odd.tar", "w") as tf:
        for key, cls in (("a", b"3"), ("b", b"dog")):
            for name, data in ((f"{key}.jpg", sorted(photos_val_dir.glob("*.jpg"))[0].read_bytes()), (f"{key}.cls", cls)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    tokenize_local(tmp_path / "odd.tar", tmp_path / "odd", RuntimeEncoder(runtime), progress=False)
    assert read_tokens(tmp_path / "odd").column("cls").to_pylist() == ["3", "dog"]

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    photos = sorted(photos_val_dir.glob("*.jpg"))[:4]
    for i, p in enumerate(photos):
        (folder / ("sub" if i % 2 else "") / f"img{i}.jpg").symlink_to(p)
    (folder / "img0.txt").write_text("a caption for img0")
    (folder / "sub" / "img1.txt").write_text("a caption for img1\n")
    (folder / "sub" / "img1.json").write_text('{"source": "val"}')
    (folder / "img2.caption.txt").write_text("a longer caption for img2")
    (folder / "notes.txt").write_text("not a sidecar")
    tokenize_local(folder, tmp_path / "f", RuntimeEncoder(runtime), progress=False)
    got = {r["key"]: (r["caption.txt"], r["json"], r["txt"]) for r in read_tokens(tmp_path / "f").to_pylist()}
    assert got == {
        "img0.jpg": (None, None, "a caption for img0"),
        "img2.jpg": ("a longer caption for img2", None, None),
        "sub/img1.jpg": (None, '{"source": "val"}', "a caption for img1\n"),
        "sub/img3.jpg": (None, None, None),
    }  # notes.txt is beside no image of that name: not carried
    tokenize_local(folder, tmp_path / "f-txt", RuntimeEncoder(runtime), columns=["txt"], progress=False)
    assert read_tokens(tmp_path / "f-txt").schema.names[7:] == ["txt"]


def test_ray_carries_the_same_columns_and_reports_progress(
    ray_local: Any,
    wds: Path,
    cifar40: Path,
    model_dir: Path,
    runtime: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    common: dict[str, Any] = dict(resize="pad", shard_size=6, batch_size=2)
    tokenize_local(wds, tmp_path / "local", RuntimeEncoder(runtime), progress=False, **common)
    advances: list[int] = []
    real_advance = JobRun.advance
    monkeypatch.setattr(JobRun, "advance", lambda self, n: (advances.append(n), real_advance(self, n)))
    # the path of a run that starts its own Ray, the session's standing in for it
    real_is_initialized = ray_local.is_initialized
    monkeypatch.setattr(ray_local, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_local, "init", lambda **kw: monkeypatch.setattr(ray_local, "is_initialized", real_is_initialized))
    monkeypatch.setattr(ray_local, "shutdown", lambda: None)
    s = tokenize_ray(wds, tmp_path / "ray", model_dir, device="cpu", progress=None, **common)
    assert s.images == 6 and files_of(tmp_path / "ray") == files_of(tmp_path / "local")
    said = capsys.readouterr().err
    assert (
        "starting a local Ray…" in said
        and "Ray ready: 2 CPUs, 0 GPUs" in said
        and "6 images to tokenize; 1 encoder actor loading tiny" in said
    )
    assert len(advances) >= 2 and sum(advances) == 6  # the bar moves as batches arrive, not once at the end

    tokenize_local(cifar40, tmp_path / "c-local", RuntimeEncoder(runtime), shard_size=16, progress=False)
    tokenize_ray(cifar40, tmp_path / "c-ray", model_dir, shard_size=16, device="cpu", progress=False)
    assert files_of(tmp_path / "c-ray") == files_of(tmp_path / "c-local")
    assert read_tokens(tmp_path / "c-ray").column("label").to_pylist() == pq.read_table(cifar40).column("label").to_pylist()
    said = capsys.readouterr().err
    assert "Ray ready" not in said and "images to tokenize" not in said  # progress=False: nothing said (Ray Data logs its own)


# ---------------------------------------------------------------- the output as a dataset
def test_the_output_folder_opens_as_a_dataset(
    awkward: Path, cifar40: Path, runtime: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow, pandas and Hugging Face `datasets` open the folder as it is, job files and errors included."""
    import pandas as pd

    out = tmp_path / "o"
    tokenize_local(cifar40, out, RuntimeEncoder(runtime), shard_size=16, progress=False)
    (out / ERRORS).write_text('{"index": 0, "key": "x", "reason": "an error line, for the readers to skip", "kind": "unreadable"}\n')
    labels = pq.read_table(cifar40).column("label").to_pylist()

    assert sorted(pq.read_table(out).column("label").to_pylist()) == sorted(labels)
    assert len(pd.read_parquet(out)) == 40 and pd.read_parquet(out)["label"].dtype == np.int64
    assert pads.dataset(out).count_rows() == 40
    assert pads.dataset(out).to_table().sort_by("index").column("label").to_pylist() == labels

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed (pip install datasets)")
    ds = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf-cache"))["train"]
    assert ds.num_rows == 40 and sorted(ds["label"]) == sorted(labels)
    assert set(ds.column_names) == {"key", "index", "tokens", "grid_h", "grid_w", "source_h", "source_w", "label"}

    # a folder input's output too (its errors file is not empty)
    tokenize_local(awkward, tmp_path / "photos", RuntimeEncoder(runtime), progress=False)
    assert errors_of(tmp_path / "photos") and pq.read_table(tmp_path / "photos").num_rows == 13
    assert datasets.load_dataset("parquet", data_dir=str(tmp_path / "photos"), cache_dir=str(tmp_path / "hf-cache"))["train"].num_rows == 13


def test_load_tokens_gives_numpy_grids(awkward: Path, runtime: Any, tmp_path: Path) -> None:
    tokenize_local(awkward, tmp_path / "o", RuntimeEncoder(runtime), resize="pad", shard_size=4, progress=False)
    tokens, table = load_tokens(tmp_path / "o"), read_tokens(tmp_path / "o")
    assert len(tokens) == table.num_rows == 11 and tokens.columns == {}  # pad, f=4: 1411² and 2400×2048 are over 256² tokens
    for row, grid in zip(table.to_pylist(), tokens.grids, strict=True):
        assert grid.dtype == np.int32 and grid.shape == (row["grid_h"], row["grid_w"])
        np.testing.assert_array_equal(grid.reshape(-1), row["tokens"])
    assert tokens.indices.tolist() == table.column("index").to_pylist()
    with pytest.raises(ValueError, match="shapes"):
        tokens.stacked()  # pad: grids of many shapes
    assert next(iter(tokens))["key"] == tokens.keys[0]


# ---------------------------------------------------------------- the old layout
def test_an_output_begun_with_the_old_layout_is_resumed(awkward: Path, runtime: Any, tmp_path: Path) -> None:
    """manifest.json and errors.jsonl beside the shards, job without carried columns, errors without
    kinds (as written before): read as it is, then resumed into __vqtok__/ with nothing redone twice."""
    common: dict[str, Any] = dict(resize="crop", shard_size=4, batch_size=4, progress=False)
    tokenize_local(awkward, tmp_path / "clean", RuntimeEncoder(runtime), **common)

    old = tmp_path / "old"
    shutil.copytree(tmp_path / "clean", old)
    body = json.loads((old / MANIFEST).read_text())
    del body["job"]["columns"]
    for rec in body["shards"].values():
        for e in rec["errors"]:
            del e["kind"]
    lost = body["shards"].pop("00003")  # the run was interrupted before the last shard
    (old / lost["file"]).unlink()
    body["complete"] = False
    (old / "manifest.json").write_text(json.dumps(body, indent=1))
    (old / "errors.jsonl").write_text("".join(json.dumps(e) + "\n" for rec in body["shards"].values() for e in rec["errors"]))
    shutil.rmtree(old / JOB_DIR)
    assert read_tokens(old).num_rows == read_tokens(tmp_path / "clean").num_rows - lost["rows"]  # the old layout reads

    s = tokenize_local(awkward, old, RuntimeEncoder(runtime), **common)
    assert (s.shards_skipped, s.shards_written) == (3, 1)
    assert files_of(old) == files_of(tmp_path / "clean")
    assert not (old / "manifest.json").exists() and not (old / "errors.jsonl").exists()
    assert (old / ERRORS).read_bytes() == (tmp_path / "clean" / ERRORS).read_bytes()  # kinds filled in
    assert [(e["key"], e["kind"]) for e in errors_of(old)] == [("corrupt.jpg", "unreadable")]
    assert json.loads((old / MANIFEST).read_text())["complete"]
