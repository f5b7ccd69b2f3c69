"""Dataset tokenization: real image folders, a CIFAR-10 parquet subset and webdataset tars; the local,
Ray and server engines give identical shards equal to direct runtime encoding; corrupt images land
in the errors file; a run killed with SIGKILL and resumed gives exactly the expected rows."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clients.client import Client
from clients.tokenize import decoding
from clients.tokenize.encoders import RuntimeEncoder, ServerEncoder
from clients.tokenize.format import ERRORS, MANIFEST, TokenizeError, read_tokens
from clients.tokenize.local import tokenize_local
from clients.tokenize.ray import actor_pool, tokenize_ray

from .conftest import REPO, Server


# ---------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory, photos_val_dir: Path, kodak_dir: Path) -> Path:
    """A few real photos in nested folders (symlinks to the shared data, read in place), one Kodak
    image (768×512) and one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    (root / "val" / "sub").mkdir(parents=True)
    photos = sorted(photos_val_dir.glob("*.jpg"))[:9]
    for i, p in enumerate(photos):
        (root / "val" / ("sub" if i % 3 == 0 else "") / p.name).symlink_to(p)
    (root / "kodim23.png").symlink_to(kodak_dir / "kodim23.png")
    (root / "val" / "broken.jpg").write_bytes(photos[0].read_bytes()[:500])  # truncated JPEG
    (root / "notes.txt").write_text("not an image, not listed")
    return root


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory: pytest.TempPathFactory, cifar_test_parquet: Path) -> Path:
    """The first 300 rows of the CIFAR-10 test shard, same HF schema, two row groups."""
    table = pq.read_table(cifar_test_parquet).slice(0, 300)
    path = tmp_path_factory.mktemp("cifar") / "test-subset.parquet"
    pq.write_table(table, path, row_group_size=200)
    return path


def cifar_arrays(path: Path) -> list[np.ndarray]:
    table = pq.read_table(path, columns=["image"])
    return [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in table.column("image").to_pylist()]


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


# ---------------------------------------------------------------- folders
def test_folder_local_engine_matches_runtime_and_records_errors(image_folder: Path, runtime: Any, tmp_path: Path) -> None:
    s = tokenize_local(image_folder, tmp_path, RuntimeEncoder(runtime), resize="none", shard_size=4, batch_size=3, progress=False)
    assert (s.images, s.errors, s.shards_written) == (10, 1, 3)  # 11 images (the .txt is ignored) in shards of 4
    assert s.decode_wait_s >= 0 and s.encode_wait_s > 0 and s.decode_wait_s + s.encode_wait_s <= s.seconds  # the stall accounting
    table = read_tokens(tmp_path)
    keys = table.column("key").to_pylist()
    assert keys == sorted(keys) and len(set(keys)) == 10 and "val/broken.jpg" not in keys and "kodim23.png" in keys
    for row in table.to_pylist():
        with Image.open(image_folder / row["key"]) as im:
            pixels = np.asarray(im.convert("RGB"))
        expected = runtime.encode(pixels[None])[0]
        tokens = np.asarray(row["tokens"], np.int32).reshape(row["grid_h"], row["grid_w"])
        np.testing.assert_array_equal(tokens, expected)
        assert (row["source_h"], row["source_w"]) == pixels.shape[:2]
    errors = [json.loads(line) for line in (tmp_path / ERRORS).read_text().splitlines()]
    assert [e["key"] for e in errors] == ["val/broken.jpg"] and "ImageError" in errors[0]["reason"]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["complete"] and manifest["totals"] == {"images": 10, "errors": 1, "shards": 3}
    meta = pq.read_schema(tmp_path / "part-00000.parquet").metadata
    assert meta[b"vqtok.model"] == b"tiny" and meta[b"vqtok.codebook_size"] == b"1000"
    assert meta[b"vqtok.manifest_sha256"] == runtime.info.manifest_sha256.encode()

    # running the finished job again does nothing; another job in the same folder is refused
    again = tokenize_local(image_folder, tmp_path, RuntimeEncoder(runtime), resize="none", shard_size=4, batch_size=3, progress=False)
    assert (again.images, again.shards_written, again.shards_skipped) == (0, 0, 3)
    with pytest.raises(TokenizeError, match="different job"):
        tokenize_local(image_folder, tmp_path, RuntimeEncoder(runtime), resize="pad", shard_size=4, progress=False)


def shared_leftovers() -> list[str]:
    """Hand-over files of this process's jobs still in tmpfs (decoding.shared_prefix)."""
    return [p.name for p in Path(decoding.SHARED_DIR).glob(f"vqtok-decode-{os.getpid()}-*")]


def test_decoding_processes_and_batches_in_flight_change_nothing(
    image_folder: Path, runtime: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding in spawned processes (pixels handed over through tmpfs), and two encoder batches in
    flight, write the same bytes and the same errors as the thread pool with one batch at a time, and
    leave no hand-over file behind."""
    if not decoding.shared_available():
        pytest.skip(f"no writable {decoding.SHARED_DIR}: the processes pickle their pixels back")
    opened: list[int] = []
    real_open = decoding.SharedChunk.open

    def spy(self: decoding.SharedChunk) -> Any:
        if self.path:
            assert Path(self.path).exists() and Path(self.path).name.startswith(f"vqtok-decode-{os.getpid()}-")
            opened.append(self.size)
        return real_open(self)

    monkeypatch.setattr(decoding.SharedChunk, "open", spy)
    common: dict[str, Any] = dict(resize="none", shard_size=4, batch_size=3, progress=False)
    tokenize_local(image_folder, tmp_path / "threads", RuntimeEncoder(runtime, concurrency=1), **common)
    assert not opened  # threads share memory already
    s = tokenize_local(
        image_folder, tmp_path / "procs", RuntimeEncoder(runtime, concurrency=2), decode_pool="process", decode_workers=2, **common
    )
    assert (s.images, s.errors, s.shards_written) == (10, 1, 3)
    assert opened and sum(opened) >= 9 * 32 * 32 * 3  # the photos' pixels came through tmpfs
    assert shared_leftovers() == []
    assert files_of(tmp_path / "procs") == files_of(tmp_path / "threads")
    assert (tmp_path / "procs" / ERRORS).read_bytes() == (tmp_path / "threads" / ERRORS).read_bytes()
    assert RuntimeEncoder(runtime).concurrency == 1  # on the CPU: the session's own threads use the cores
    with pytest.raises(TokenizeError, match="unknown decode pool"):
        tokenize_local(image_folder, tmp_path / "bad", RuntimeEncoder(runtime), decode_pool="fibers", **common)  # type: ignore[arg-type]
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_a_killed_decoding_process_stops_the_run_with_a_clear_error_and_resume_completes_it(
    cifar_subset: Path, runtime: Any, tmp_path: Path
) -> None:
    common: dict[str, Any] = dict(shard_size=64, batch_size=16, progress=False)
    tokenize_local(cifar_subset, tmp_path / "clean", RuntimeEncoder(runtime), **common)

    def kill_decoders(shard: int) -> None:  # after the first commit, SIGKILL every decoding process
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]

    out = tmp_path / "killed"
    with pytest.raises(TokenizeError, match=r"decoding process died.*run the same command again"):
        tokenize_local(
            cifar_subset, out, RuntimeEncoder(runtime), decode_pool="process", decode_workers=2, on_commit=kill_decoders, **common
        )
    done = json.loads((out / MANIFEST).read_text())["shards"]
    assert 1 <= len(done) < 5  # what was committed before the kill is kept
    assert shared_leftovers() == []  # chunks decoded but never taken are swept
    s = tokenize_local(cifar_subset, out, RuntimeEncoder(runtime), decode_pool="process", decode_workers=2, **common)
    assert s.shards_skipped == len(done) and s.shards_written == 5 - len(done)
    assert files_of(out) == files_of(tmp_path / "clean")


def test_crop_mode_and_webdataset_tars_match_the_folder(image_folder: Path, photos_val_dir: Path, runtime: Any, tmp_path: Path) -> None:
    photos = sorted(photos_val_dir.glob("*.jpg"))[:5]
    shards = tmp_path / "wds"
    shards.mkdir()
    for n, group in enumerate([photos[:3], photos[3:]]):
        with tarfile.open(shards / f"shard-{n:03d}.tar", "w") as tf:
            for p in group:
                stem = p.stem.replace(".", "_")
                tf.add(p, arcname=f"{stem}.jpg")
                info = tarfile.TarInfo(f"{stem}.cls")
                info.size = 1
                tf.addfile(info, io.BytesIO(b"7"))
    folder = tmp_path / "folder"
    folder.mkdir()
    for p in photos:
        (folder / p.name).symlink_to(p)
    tokenize_local(shards, tmp_path / "a", RuntimeEncoder(runtime), resize="crop", shard_size=2, progress=False)
    tokenize_local(folder, tmp_path / "b", RuntimeEncoder(runtime), resize="crop", shard_size=2, progress=False)
    a, b = read_tokens(tmp_path / "a"), read_tokens(tmp_path / "b")
    assert a.column("key").to_pylist()[0] == f"shard-000.tar/{photos[0].stem}"
    assert a.column("tokens").equals(b.column("tokens")) and a.num_rows == 5
    assert set(a.column("grid_h").to_pylist()) == {8}  # crop: native 32 px / f=4


# ---------------------------------------------------------------- engines agree
def test_parquet_local_ray_and_runtime_agree(ray_local: Any, cifar_subset: Path, model_dir: Path, runtime: Any, tmp_path: Path) -> None:
    local = tokenize_local(cifar_subset, tmp_path / "local", RuntimeEncoder(runtime), shard_size=64, batch_size=32, progress=False)
    # two batches at once in the encoder actor (the GPU default is three): same bytes
    ray = tokenize_ray(
        cifar_subset, tmp_path / "ray", model_dir, shard_size=64, batch_size=32, device="cpu", actor_concurrency=2, progress=False
    )
    assert local.images == ray.images == 300 and ray.shards_written == 5
    assert files_of(tmp_path / "local") == files_of(tmp_path / "ray")  # byte-identical shards
    table = read_tokens(tmp_path / "ray")
    assert table.column("key").to_pylist()[:2] == ["test-subset.parquet:0", "test-subset.parquet:1"]
    tokens = np.asarray(table.column("tokens").to_pylist(), np.int32).reshape(-1, 8, 8)
    expected = runtime.encode(np.stack(cifar_arrays(cifar_subset)))
    np.testing.assert_array_equal(tokens, expected)


def test_actor_pool_runs_several_batches_per_actor_and_falls_back_on_an_older_ray(caplog: pytest.LogCaptureFixture) -> None:
    import ray

    pool = actor_pool(ray, 2, 3)
    assert (pool.min_size, pool.max_concurrent_calls_per_actor, pool.enable_true_multi_threading) == (2, 3, True)

    class OldStrategy:  # the options' signature before Ray had them
        def __init__(self, *, size: int) -> None:
            self.size = size

    old_ray = types.SimpleNamespace(__version__="2.40.0", data=types.SimpleNamespace(ActorPoolStrategy=OldStrategy))
    assert actor_pool(old_ray, 2, 3).size == 2 and "cannot run 3 batches at once" in caplog.text


def test_ray_engine_on_folders_with_errors_and_resume(
    ray_local: Any, image_folder: Path, model_dir: Path, runtime: Any, tmp_path: Path
) -> None:
    tokenize_local(image_folder, tmp_path / "local", RuntimeEncoder(runtime), resize="pad", shard_size=4, progress=False)
    s = tokenize_ray(image_folder, tmp_path / "ray", model_dir, resize="pad", shard_size=4, batch_size=4, device="cpu", progress=False)
    assert (s.images, s.errors) == (10, 1)
    assert files_of(tmp_path / "local") == files_of(tmp_path / "ray")
    assert (tmp_path / "local" / ERRORS).read_bytes() == (tmp_path / "ray" / ERRORS).read_bytes()
    # a shard lost after commit (file deleted) is redone by the next run, identically
    before = files_of(tmp_path / "ray")
    (tmp_path / "ray" / "part-00001.parquet").unlink()
    again = tokenize_ray(image_folder, tmp_path / "ray", model_dir, resize="pad", shard_size=4, batch_size=4, device="cpu", progress=False)
    assert (again.shards_written, again.shards_skipped) == (1, 2) and files_of(tmp_path / "ray") == before


def test_server_engine_matches_local(server: Server, cifar_subset: Path, runtime: Any, tmp_path: Path) -> None:
    tokenize_local(cifar_subset, tmp_path / "local", RuntimeEncoder(runtime), shard_size=100, progress=False)
    with Client(server.url) as client:
        s = tokenize_local(cifar_subset, tmp_path / "server", ServerEncoder(client, None), shard_size=100, progress=False)
    assert s.images == 300
    assert files_of(tmp_path / "local") == files_of(tmp_path / "server")


def test_server_engine_sends_stored_files_and_isolates_a_refused_one(
    server: Server, serve: Callable[..., Server], image_folder: Path, runtime: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JPEGs and a PNG of another size go as stored (nothing decoded or re-encoded here) and match the
    local engine byte for byte, source sizes included; the truncated JPEG is caught by the header read.
    An image the server refuses (413: over its tokens-per-image limit) is retried alone and recorded,
    and the rest of its batch is tokenized."""
    sent: list[bytes] = []
    real = Client.encode

    def spy(self: Client, images: Any, **kw: Any) -> Any:
        sent.extend(images)
        return real(self, images, **kw)

    monkeypatch.setattr(Client, "encode", spy)
    common: dict[str, Any] = dict(resize="pad", shard_size=4, batch_size=8, progress=False)
    tokenize_local(image_folder, tmp_path / "local", RuntimeEncoder(runtime), **common)
    roomy = serve(max_grid_tokens=1 << 20)  # Kodak's 768×512 is over the default limit for this f=4 model
    with Client(roomy.url) as client:
        s = tokenize_local(image_folder, tmp_path / "server", ServerEncoder(client, None), **common)
    assert (s.images, s.errors) == (10, 1)
    assert files_of(tmp_path / "local") == files_of(tmp_path / "server")
    errors = [json.loads(line) for line in (tmp_path / "server" / ERRORS).read_text().splitlines()]
    assert [e["key"] for e in errors] == ["val/broken.jpg"]
    stored = {p.read_bytes() for p in image_folder.rglob("*") if p.suffix in (".jpg", ".png")}
    assert len(sent) >= 10 and set(sent) <= stored  # every file went as it is stored

    with Client(server.url) as client:
        s = tokenize_local(image_folder, tmp_path / "strict", ServerEncoder(client, None), **common)
    assert (s.images, s.errors) == (9, 2)
    refused = {e["key"]: e["reason"] for e in map(json.loads, (tmp_path / "strict" / ERRORS).read_text().splitlines())}
    assert refused.keys() == {"kodim23.png", "val/broken.jpg"} and refused["kodim23.png"].startswith("PayloadTooLargeError: 413")
    table = read_tokens(tmp_path / "strict")
    assert table.equals(read_tokens(tmp_path / "local").filter(pc.field("key") != "kodim23.png"))


# ---------------------------------------------------------------- faults
def test_interrupted_commit_is_redone_without_duplicates(cifar_subset: Path, runtime: Any, tmp_path: Path) -> None:
    """The windows of a commit: a temp file not yet renamed, and a renamed shard not yet in the manifest."""
    out = tmp_path / "out"
    tokenize_local(cifar_subset, out, RuntimeEncoder(runtime), shard_size=64, progress=False)
    reference = files_of(out)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["shards"]["00002"]  # part-00002 was renamed into place, the manifest update never happened
    manifest["complete"] = False
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / ".part-00003.parquet.tmp-99999").write_bytes(b"half a parquet file")
    s = tokenize_local(cifar_subset, out, RuntimeEncoder(runtime), shard_size=64, progress=False)
    assert (s.images, s.shards_written, s.shards_skipped) == (64, 1, 4)
    assert files_of(out) == reference and not list(out.glob(".part-*"))
    assert read_tokens(out).column("index").to_pylist() == list(range(300))


def _cli(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    entry = "import sys; from vqtok.cli import main; sys.exit(main())"  # what the `vqtok` console command runs
    return subprocess.Popen(
        [sys.executable, "-c", entry, "tokenize", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_then_resume_gives_exactly_the_expected_rows(
    cifar_test_parquet: Path, model_dir: Path, runtime: Any, tmp_path: Path
) -> None:
    subset = tmp_path / "cifar-4000.parquet"
    pq.write_table(pq.read_table(cifar_test_parquet).slice(0, 4000), subset, row_group_size=1000)
    out = tmp_path / "out"
    args = [
        "--input",
        str(subset),
        "--output",
        str(out),
        "--model",
        str(model_dir),
        "--shard-size",
        "200",
        "--batch-size",
        "50",
        "--device",
        "cpu",
        "--no-progress",
    ]
    proc = _cli(args)
    deadline, committed = time.monotonic() + 120, 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            committed = len(json.loads((out / MANIFEST).read_text())["shards"])
        except (OSError, ValueError):
            committed = 0
        if committed >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was not killed mid-way (rc={proc.returncode}): {proc.stderr.read() if proc.stderr else ''}"
    )
    killed = json.loads((out / MANIFEST).read_text())
    assert not killed["complete"] and 2 <= len(killed["shards"]) < 20

    resumed = _cli([a for a in args if a != "--no-progress"])  # stderr is a pipe: progress comes as plain lines
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "already done" in stdout
    assert re.search(r"tokenize \S+: (\d+)/\1 images \(100\.0 %\)", stderr), stderr[-2000:]  # no terminal: progress as lines
    table = read_tokens(out)
    assert table.column("index").to_pylist() == list(range(4000))  # none lost, none duplicated
    assert table.column("key").to_pylist() == [f"cifar-4000.parquet:{i}" for i in range(4000)]
    final = json.loads((out / MANIFEST).read_text())
    assert final["complete"] and final["totals"]["images"] == 4000
    for k, rec in killed["shards"].items():  # shards committed before the kill were kept as they were
        assert final["shards"][k]["sha256"] == rec["sha256"]
    # and the result is what an uninterrupted run writes
    tokenize_local(subset, tmp_path / "clean", RuntimeEncoder(runtime), shard_size=200, batch_size=50, progress=False)
    assert files_of(out) == files_of(tmp_path / "clean")
    sample = np.asarray(table.column("tokens").to_pylist()[:64], np.int32).reshape(-1, 8, 8)
    np.testing.assert_array_equal(sample, runtime.encode(np.stack(cifar_arrays(subset)[:64])))


def test_cli_user_errors(tmp_path: Path) -> None:
    from vqtok.cli import main

    assert main(["tokenize", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--model", "x"]) == 2
    assert main(["tokenize", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "no-such-model"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    pa.table({"x": [1]})  # pyarrow is importable; an empty folder is still no dataset
    assert main(["tokenize", "--input", str(empty), "--output", str(tmp_path / "o"), "--model", str(tmp_path)]) != 0


def test_local_paths_import_neither_the_server_nor_torch() -> None:
    """The local backend and dataset tokenization share the service's image rules, not its server
    stack: no FastAPI, no pydantic-settings, no torch."""
    code = (
        "import sys, clients.local, clients.tokenize, models.core.pixels\n"
        "heavy = {'fastapi', 'pydantic_settings', 'torch'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


_FULL_TMPFS = """
import sys, os
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from clients.tokenize import decoding
from clients.tokenize.format import ModelSpec
from models.core.sources import RawItem
decoding.SHARED_DIR = sys.argv[2]
files = sorted(Path(sys.argv[3]).glob("*.jpg"))[:16]  # 16 x 196,608 bytes of 256² pixels: 3 MiB, over a 1 MiB tmpfs
items = [RawItem(i, p.name, data=p.read_bytes()) for i, p in enumerate(files)]
chunk = decoding.decode_shared(items, ModelSpec("m", 1024, 8, 256, "x", "fp32"), "crop", prefix="vqtok-decode-test-")
arrays = [p for p, *_ in chunk.open() if p is not None]
print(repr(chunk.path), len(arrays), sum(a.nbytes for a in arrays), len(os.listdir(sys.argv[2])))
"""


def test_a_full_tmpfs_sends_the_pixels_through_the_pipe_instead_of_killing_the_worker(photos_val_dir: Path, tmp_path: Path) -> None:
    """A decoding process writes a chunk into /dev/shm; where it is full (a container's 64 MiB), the
    chunk comes back pickled. Writing through a mapping of an unallocated file on a full tmpfs is SIGBUS,
    so the file's pages are allocated first. A real 1 MiB tmpfs, in a child process (root only)."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        r = subprocess.run(
            [sys.executable, "-c", _FULL_TMPFS, str(REPO), str(mnt), str(photos_val_dir)], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, f"the decoding code died (rc {r.returncode}, SIGBUS is -7): {r.stderr[-2000:]}"
        path, count, nbytes, left = r.stdout.split()
        assert (path, int(count), int(nbytes), int(left)) == ("''", 16, 16 * 256 * 256 * 3, 0)  # pickled back, nothing left
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_progress_is_plain_lines_where_no_terminal_shows_a_bar() -> None:
    import io

    from clients.tokenize.job import ProgressLines

    out = io.StringIO()
    lines = ProgressLines(200, "tokenize m", every_s=0.0, stream=out)
    for _ in range(4):
        lines.update(50)
    lines.close()
    text = out.getvalue().splitlines()
    assert len(text) == 5 and text[0].startswith("tokenize m: 50/200 images (25.0 %)") and "about" in text[0]
    assert text[-1].startswith("tokenize m: 200/200 images (100.0 %)")
