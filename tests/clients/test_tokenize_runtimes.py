"""`vqtok tokenize --runtime`: the engines load their model through `models.runtime.choose.load_runtime`;
a forced ONNX Runtime gives the same shards as the default on a CPU host (local and Ray alike), a
forced compiled runtime on a CPU host is a clear error with a non-zero exit; bench/ray_scale.py runs
end to end on the CPU (a real Ray, real photos, the tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clients.tokenize.encoders import RuntimeEncoder, load_encoder_runtime
from clients.tokenize.local import tokenize_local
from clients.tokenize.ray import decode_task_images, tokenize_ray
from models.core.errors import ModelLoadError
from vqtok.cli import main

from .conftest import REPO


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory, photos_val_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for p in sorted(photos_val_dir.glob("*.jpg"))[:40]:
        (root / p.name).symlink_to(p)
    (root / "broken.jpg").write_bytes(b"not a jpeg")  # an error row in the middle of a batch
    return root


def test_forced_onnxruntime_matches_the_default_in_both_engines(
    ray_local: Any, photo_folder: Path, model_dir: Path, tmp_path: Path
) -> None:
    args = ["tokenize", "--input", str(photo_folder), "--model", str(model_dir), "--device", "cpu", "--no-progress"]
    args += ["--batch-size", "8", "--shard-size", "16"]
    assert main([*args, "--output", str(tmp_path / "auto")]) == 0
    assert main([*args, "--output", str(tmp_path / "ort"), "--runtime", "onnxruntime"]) == 0
    s = tokenize_ray(
        photo_folder, tmp_path / "ray", model_dir, runtime="onnxruntime", device="cpu", batch_size=8, shard_size=16, progress=False
    )
    assert (s.images, s.unreadable, s.shards_written) == (40, 1, 3)
    assert s.first_result_s > 0 and s.steady_rows_per_s > 0
    assert files_of(tmp_path / "auto") == files_of(tmp_path / "ort") == files_of(tmp_path / "ray")
    assert len(files_of(tmp_path / "ray")) == 3


def test_the_local_engine_runs_what_load_runtime_picks(model_dir: Path, photo_folder: Path, tmp_path: Path) -> None:
    rt = load_encoder_runtime(model_dir, runtime="auto", device="cpu", batch_size=8, resize="crop")
    assert rt.runtime_name.startswith("onnxruntime") or "CPUExecutionProvider" in rt.providers
    s = tokenize_local(photo_folder, tmp_path / "o", RuntimeEncoder(rt), batch_size=8, shard_size=16, progress=False)
    assert (s.images, s.unreadable) == (40, 1)


def test_forced_compiled_runtime_on_a_cpu_host_is_a_clear_error(
    ray_local: Any, photo_folder: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for engine in ("local", "ray"):
        args = ["tokenize", "--input", str(photo_folder), "--output", str(tmp_path / engine), "--model", str(model_dir)]
        code = main([*args, "--engine", engine, "--runtime", "compiled", "--no-progress"])
        err = capsys.readouterr().err
        assert code != 0, engine
        assert "compiled runtime cannot run here" in err, err
        assert "Traceback" not in err
        assert not list((tmp_path / engine).glob("part-*.parquet"))
    with pytest.raises(ModelLoadError, match="CUDA only"):
        tokenize_ray(photo_folder, tmp_path / "r", model_dir, runtime="compiled", device="cpu", progress=False)


def test_decode_tasks_are_batch_multiples_that_give_every_core_work() -> None:
    assert decode_task_images(100_000, 64, 64) == 512  # a large job: the largest tasks
    assert decode_task_images(5_000, 64, 64) == 64  # a small one: at least two tasks a core, one batch each
    assert decode_task_images(20_000, 32, 2) == 512
    assert decode_task_images(10, 32, 2) == 32
    assert decode_task_images(3_000, 48, 4) % 48 == 0


@pytest.mark.timeout(300)
@pytest.mark.xdist_group("ray")  # a local Ray of its own (the bench's process): on the worker of the other Ray tests, never at once
def test_ray_scale_bench_runs_on_the_cpu(model_dir: Path, photos_val_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray_scale.json"
    env = {**os.environ, "VQTOK_DATA": str(photos_val_dir.parents[1]), "PYTHONPATH": str(REPO)}  # run outside the checkout
    cmd = [sys.executable, "-m", "bench.ray_scale", "--model", str(model_dir), "--device", "cpu"]
    cmd += ["--batch-size", "16", "--images", "96", "--max-images", "96", "--seconds", "1", "--raw-seconds", "0.5"]
    cmd += ["--cpu-actors", "2", "--time-limit", "240", "--revision", "test", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["revision"] == "test" and report["machine"]["gpus"] == [] and report["machine"]["cpus"] == os.cpu_count()
    assert report["runtime"]["device"] == "cpu"
    for engine in ("raw_start", "raw_end", "local", "ray_1", "ray_all"):
        assert report["results"][engine]["images_per_s"] > 0, engine
    assert report["results"]["ray_1"]["images"] == report["results"]["ray_all"]["images"] == 96
    assert set(report["ratios"]) >= {"ray_1/raw", "ray_all/ray_1", "local/raw", "ray_1/raw_steady"}
    assert "ray_all/ray_1" in proc.stdout
