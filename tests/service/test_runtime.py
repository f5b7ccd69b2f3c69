"""The torch-free ONNX Runtime module: loading, verification and its clear errors, IO contracts."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.runtime.onnx import InvalidInputError, ModelLoadError, ModelRuntime
from tests.helpers import exported_model_repo


@pytest.fixture(scope="module")
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SimVQ exported with its parity checked on Kodak: the suite's shared export (tests.helpers), copied here."""
    return exported_model_repo(request, tmp_path_factory, {"simvq": "cifar-simvq"}) / "simvq"


@pytest.fixture()
def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


def test_runtime_does_not_import_torch(model_dir: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from models.runtime.onnx import ModelRuntime\n"
        f"rt = ModelRuntime.load({str(model_dir)!r})\n"
        "ids = rt.encode(np.zeros((1, 32, 32, 3), np.uint8))\n"
        "rt.decode(ids)\n"
        "assert 'torch' not in sys.modules, 'runtime imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_info_and_contracts(model_dir: Path) -> None:
    rt = ModelRuntime.load(model_dir, name="tiny")
    assert rt.info.name == "tiny" and rt.info.codebook_size == 1024 and rt.info.downsample == 4
    assert rt.info.precision == "fp32" and rt.providers == ["CPUExecutionProvider"]
    assert len(rt.info.manifest_sha256) == 64
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 40, 24, 3), dtype=np.uint8)
    ids = rt.encode(images)
    assert ids.dtype == np.int32 and ids.shape == (2, 10, 6)
    out = rt.decode(ids.astype(np.int64))  # any integer dtype is accepted
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.array_equal(rt.encode(images), ids)
    rt.warmup([(32, 32)], batch_sizes=(1, 2))


def test_invalid_inputs(model_dir: Path) -> None:
    rt = ModelRuntime.load(model_dir)
    with pytest.raises(InvalidInputError, match="uint8"):
        rt.encode(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(InvalidInputError, match="multiples of 4"):
        rt.encode(np.zeros((1, 30, 32, 3), np.uint8))
    with pytest.raises(InvalidInputError, match=r"\(B, H, W, 3\)"):
        rt.encode(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="positive"):
        rt.encode(np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(InvalidInputError, match=r"\[0, 1024\)"):
        rt.decode(np.full((1, 2, 2), 1024))
    with pytest.raises(InvalidInputError, match=r"\[0, 1024\)"):
        rt.decode(np.full((1, 2, 2), -1))
    with pytest.raises(InvalidInputError, match="integers"):
        rt.decode(np.zeros((1, 2, 2), np.float32))
    with pytest.raises(InvalidInputError, match="non-empty"):
        rt.decode(np.zeros((1, 0, 2), np.int32))


def test_truncated_onnx_is_a_clear_error(copy_of: Path) -> None:
    path = copy_of / "encoder.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"does not match manifest\.json"):
        ModelRuntime.load(copy_of)
    # even with the hash "fixed", ORT's refusal becomes a ModelLoadError, not a crash
    from models.core.artefacts import sha256_file

    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["files"]["encoder.onnx"]["sha256"] = sha256_file(path)
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="ONNX Runtime could not load"):
        ModelRuntime.load(copy_of)


def test_hash_mismatch_missing_file_and_missing_export(copy_of: Path, tmp_path: Path) -> None:
    data = bytearray((copy_of / "decoder.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy_of / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt or was replaced"):
        ModelRuntime.load(copy_of)
    (copy_of / "decoder.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"decoder\.onnx is missing"):
        ModelRuntime.load(copy_of)
    manifest = json.loads((copy_of / "manifest.json").read_text())
    del manifest["graphs"]
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="incomplete or malformed"):
        ModelRuntime.load(copy_of)
    (copy_of / "manifest.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="corrupt"):
        ModelRuntime.load(copy_of)
    (copy_of / "manifest.json").unlink()
    with pytest.raises(ModelLoadError, match="run `vqtok export"):
        ModelRuntime.load(copy_of)
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelRuntime.load(tmp_path / "nowhere")


def test_precision_and_device_requests(model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no fp16 graphs"):
        ModelRuntime.load(model_dir, precision="fp16")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ModelLoadError, match="CUDAExecutionProvider"):
            ModelRuntime.load(model_dir, device="cuda")


def test_batch_buckets() -> None:
    from models.runtime.onnx import batch_buckets

    assert batch_buckets(64) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    assert batch_buckets(1) == (1,)
    assert batch_buckets(20) == (1, 2, 3, 4, 6, 8, 12, 16, 20)
    for m in range(1, 300):
        b = batch_buckets(m)
        assert b[0] == 1 and b[-1] == m and list(b) == sorted(set(b))
        assert all(hi <= 1.5 * lo + 1e-9 or lo == 1 for lo, hi in itertools.pairwise(b))  # padding wastes ≤ a third
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_padded_batches_match_unpadded(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A padding runtime only ever shows ORT its bucket sizes, and answers exactly as an unpadded one."""
    plain = ModelRuntime.load(model_dir)
    padded = ModelRuntime.load(model_dir, pad_batches=True, max_batch_size=8)
    assert plain.buckets is None and padded.buckets == (1, 2, 3, 4, 6, 8)
    seen: list[int] = []
    run_session = padded._run_session

    def spy(session: object, name: str, array: np.ndarray) -> np.ndarray:
        seen.append(len(array))
        return run_session(session, name, array)

    monkeypatch.setattr(padded, "_run_session", spy)
    rng = np.random.default_rng(1)
    for n, shapes in ((5, [6]), (8, [8]), (1, [1]), (19, [8, 8, 3])):
        images = rng.integers(0, 256, size=(n, 32, 24, 3), dtype=np.uint8)
        seen.clear()
        ids = padded.encode(images)
        assert seen == shapes, n
        assert ids.shape == (n, 8, 6) and np.array_equal(ids, plain.encode(images))
        seen.clear()
        assert np.array_equal(padded.decode(ids), plain.decode(ids)) and seen == shapes
    seen.clear()
    padded.warmup([(16, 16)])  # no batch sizes: every bucket, each once per graph
    assert seen == [1, 1, 2, 2, 3, 3, 4, 4, 6, 6, 8, 8]
    with pytest.raises(ModelLoadError, match="max_batch_size"):
        ModelRuntime.load(model_dir, max_batch_size=0)


def test_one_session_per_input_shape(model_dir: Path) -> None:
    """With per-shape sessions each shape gets its own ORT session (a CUDA session re-picks its cuDNN
    algorithms whenever its input shape changes); answers are unchanged."""
    from models.runtime.onnx import ShapeSessions

    plain = ModelRuntime.load(model_dir)
    rt = ModelRuntime.load(model_dir, pad_batches=True, session_per_shape=True, max_batch_size=4)
    assert plain.session_shapes() == {}
    rng = np.random.default_rng(2)
    for n in (3, 1, 2, 3):
        images = rng.integers(0, 256, size=(n, 32, 24, 3), dtype=np.uint8)
        ids = rt.encode(images)
        assert np.array_equal(ids, plain.encode(images))
        assert np.array_equal(rt.decode(ids), plain.decode(ids))
    assert rt.session_shapes()["encoder"] == [(1, 32, 24, 3), (2, 32, 24, 3), (3, 32, 24, 3)]  # least recent first
    assert sorted(rt.session_shapes()["decoder"]) == [(1, 8, 6), (2, 8, 6), (3, 8, 6)]

    made: list[int] = []
    cache = ShapeSessions(lambda: made.append(1) or len(made), capacity=2)
    assert [cache.get((1,)), cache.get((2,)), cache.get((1,))] == [1, 2, 1]  # (1,) is now the most recent
    assert cache.get((3,)) == 3 and cache.shapes() == [(1,), (3,)]  # (2,) was dropped
    assert cache.get((2,)) == 4 and len(made) == 4
    cache.reserve(3)
    assert cache.get((1,)) == 5 and sorted(cache.shapes()) == [(1,), (2,), (3,)]  # room for 3: nothing dropped


def test_per_shape_session_failure_falls_back_to_the_shared_session(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A session that cannot be built (on a GPU: out of memory) costs speed, not the request."""
    rt = ModelRuntime.load(model_dir, session_per_shape=True)
    plain = ModelRuntime.load(model_dir)

    attempts: list[int] = []

    def broken() -> None:
        attempts.append(1)
        raise RuntimeError("CUDNN failure 4000: CUDNN_STATUS_INTERNAL_ERROR (injected)")

    rt._per_shape["encoder"]._factory = broken  # type: ignore[index]
    images = np.random.default_rng(3).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    with caplog.at_level("WARNING", logger="models.runtime.onnx"):
        for _ in range(3):
            assert np.array_equal(rt.encode(images), plain.encode(images))
    assert "shared session" in caplog.text and "CUDNN_STATUS_INTERNAL_ERROR" in caplog.text
    assert len(attempts) == 1 and caplog.text.count("CUDNN_STATUS_INTERNAL_ERROR") == 1  # tried and logged once
    assert rt.session_shapes()["encoder"] == []
