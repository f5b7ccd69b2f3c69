"""Runtime selection and the GPU parity gate, on the CPU: a forced runtime that cannot run is a clear
error, auto picks ONNX Runtime without a GPU, the compiled runtime's graphs (eager on the CPU) give
the ONNX tokens within the gate's bounds, and a runtime that disagrees with the model's parity set
is refused with the numbers."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.core import gate
from models.core.artefacts import file_record
from models.core.errors import ModelLoadError
from models.runtime import choose as runtimes
from models.runtime.choose import load_runtime
from models.runtime.onnx import ModelRuntime

from .conftest import photo_crop


def test_export_writes_the_parity_set_and_lists_it(model_repo: Path) -> None:
    d = model_repo / "simvq4"
    parity = gate.read_parity_set(d)
    assert parity is not None
    manifest = json.loads((d / "manifest.json").read_text())
    assert gate.PARITY_FILE in manifest["files"]
    assert parity.images.dtype == np.uint8 and parity.images.shape[1:] == (32, 32, 3)  # the model's native size
    assert parity.tokens.shape == (len(parity.images), 8, 8)
    ort = ModelRuntime.load(d, device="cpu")
    figures = ort.check_parity()  # ORT on the CPU reproduces the torch float32 reference
    assert figures is not None and figures["token_agreement"] >= 0.999 and figures["decode_psnr_db"] >= 50


def test_forced_and_unknown_runtimes(model_repo: Path) -> None:
    with pytest.raises(ModelLoadError, match="runtime must be one of"):
        load_runtime(model_repo / "fsq4", runtime="tensorrt")
    with pytest.raises(ModelLoadError, match="compiled runtime"):
        load_runtime(model_repo / "fsq4", runtime="compiled", device="cpu")
    with pytest.raises(ModelLoadError, match=r"(sees no CUDA device|CUDA only)"):
        load_runtime(model_repo / "fsq4", runtime="compiled")


def test_auto_is_onnxruntime_without_a_usable_gpu(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rt = load_runtime(model_repo / "fsq4", runtime="auto", device="auto")
    assert isinstance(rt, ModelRuntime) and rt.device == "cpu"
    # a GPU that torch cannot use: auto says why and serves with ONNX Runtime
    monkeypatch.setattr(runtimes, "gpu_visible", lambda: True)
    with caplog.at_level(logging.INFO, logger="models.runtime.choose"):
        rt = load_runtime(model_repo / "fsq4", runtime="auto")
    assert isinstance(rt, ModelRuntime)
    assert any("compiled runtime unavailable" in r.getMessage() for r in caplog.records)


def test_auto_names_both_reasons_when_neither_runtime_can_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory that is no model, on a host where the compiled runtime could run: the refusal says why
    for both runtimes (it once said only ONNX Runtime's, "no CUDAExecutionProvider", which hid the cause)."""
    import models.runtime.compiled

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    monkeypatch.setattr(runtimes, "gpu_visible", lambda: True)
    monkeypatch.setattr(models.runtime.compiled, "compiled_available", lambda: None)
    with pytest.raises(ModelLoadError, match=r"no runtime can serve it: compiled: .*not a vqtok model directory.*; ONNX Runtime: "):
        load_runtime(empty, runtime="auto")


def test_compiled_graphs_match_onnxruntime_and_pad_to_their_buckets(model_repo: Path, photos: list[Path]) -> None:
    from models.runtime.compiled import CompiledRuntime

    d = model_repo / "simvq4"
    ort = ModelRuntime.load(d, device="cpu")
    rt = CompiledRuntime.load(d, eager_cpu=True, max_batch_size=8)  # passes its parity gate at load
    assert rt.buckets == (1, 2, 4, 8) and rt.runtime_name.startswith("eager torch")
    images = np.stack([photo_crop(p, 32) for p in photos[:11]])
    rt.warmup([(32, 32)])
    shapes = rt.session_shapes()["encoder"]
    assert (8, 32, 32, 3) in shapes and (3, 32, 32, 3) not in shapes
    got, want = rt.encode(images), ort.encode(images)  # 11 = a chunk of 8, and 3 padded to 4
    assert got.dtype == np.int32 and got.shape == want.shape
    assert (got == want).mean() >= gate.GPU_PARITY.min_token_agreement
    decoded = rt.decode(want)
    assert gate.psnr_uint8(decoded, ort.decode(want)) >= gate.GPU_PARITY.min_decode_psnr_db
    # a size nobody warmed runs on the ONNX fallback, not a compile inside a request
    odd = np.stack([photo_crop(p, 40) for p in photos[:2]])
    np.testing.assert_array_equal(rt.encode(odd), ort.encode(odd))
    assert (2, 40, 40, 3) not in rt.session_shapes()["encoder"]


def test_compiled_runtime_loads_with_buckets_smaller_than_its_parity_set(model_repo: Path) -> None:
    from models.runtime.compiled import CompiledRuntime

    d = model_repo / "simvq4"
    parity = gate.read_parity_set(d)
    assert parity is not None and len(parity.images) > 2
    rt = CompiledRuntime.load(d, eager_cpu=True, max_batch_size=2)  # the gate's images run in chunks of 2
    assert rt.buckets == (1, 2)
    assert rt.session_shapes()["encoder"] == [(2, *parity.images.shape[1:])]


def test_a_batch_whose_bucket_was_not_warmed_pads_to_the_next_warmed_one(model_repo: Path, photos: list[Path]) -> None:
    """What a tokenization job relies on: it warms only its batch size, and its short batches (a shard's
    end) run on that graph, padded, not on the ONNX fallback and not on a new compile."""
    from models.runtime.compiled import CompiledRuntime

    d = model_repo / "simvq4"
    ort = ModelRuntime.load(d, device="cpu")
    rt = CompiledRuntime.load(d, eager_cpu=True, max_batch_size=16)
    rt.warmup([(32, 32)], [16], parts=("encode",))
    before = sorted(rt.session_shapes()["encoder"])
    assert (16, 32, 32, 3) in before and (4, 32, 32, 3) not in before  # (the gate warmed its own batch of 8)

    def no_fallback(images: np.ndarray) -> np.ndarray:
        raise AssertionError(f"the ONNX fallback ran a batch of {len(images)}")

    rt.fallback.encode = no_fallback  # type: ignore[method-assign]
    images = np.stack([photo_crop(p, 32) for p in photos[:3]])
    got = rt.encode(images)  # bucket 4 was never warmed: padded to the next warmed one
    assert sorted(rt.session_shapes()["encoder"]) == before  # nothing compiled or captured in the request
    assert got.shape == (3, 8, 8) and (got == ort.encode(images)).mean() >= gate.GPU_PARITY.min_token_agreement
    with pytest.raises(AssertionError, match="the ONNX fallback ran"):
        rt.encode(np.stack([photo_crop(p, 40) for p in photos[:2]]))  # an image size nobody warmed: the fallback


def test_warmed_batch_sizes_between_the_powers_of_two_are_buckets_too(model_repo: Path, photos: list[Path]) -> None:
    """`warmup_batch_sizes` such as 12 and 24 are buckets of their own: a batch of 10 pads to 12, not 16
    (less padding where single-image requests form batches of 9-24 on the GPU)."""
    from models.runtime.compiled import CompiledRuntime

    d = model_repo / "simvq4"
    rt = CompiledRuntime.load(d, eager_cpu=True, max_batch_size=32)
    rt.warmup([(32, 32)], [12, 16, 24, 40], parts=("encode",))  # 40 is above max_batch_size: warmed as 32
    shapes = {s[0] for s in rt.session_shapes()["encoder"] if s[1:] == (32, 32, 3)}
    assert {12, 16, 24, 32} <= shapes
    ran: list[int] = []

    def recording(graph: Any, size: int) -> Callable[[np.ndarray], np.ndarray]:
        real = graph.run

        def run(host: np.ndarray) -> np.ndarray:
            ran.append(size)
            return real(host)  # type: ignore[no-any-return]

        return run

    for size in (12, 16, 24, 32):
        graph = rt._captured[("encode", (size, 32, 32, 3))]
        graph.run = recording(graph, size)
    images = np.stack([photo_crop(photos[i % len(photos)], 32) for i in range(30)])
    for n, expected in ((10, 12), (12, 12), (13, 16), (17, 24), (25, 32)):
        ran.clear()
        assert rt.encode(images[:n]).shape == (n, 8, 8)
        assert ran == [expected], (n, ran)


def test_the_gate_refuses_a_runtime_that_disagrees(model_repo: Path, tmp_path: Path) -> None:
    from models.runtime.compiled import CompiledRuntime

    d = tmp_path / "simvq4"
    shutil.copytree(model_repo / "simvq4", d)
    parity = gate.read_parity_set(d)
    assert parity is not None
    wrong = gate.ParitySet(parity.images, (parity.tokens + 1) % 1024, parity.decoded)  # every token off by one
    gate.write_parity_set(d / gate.PARITY_FILE, wrong)
    with pytest.raises(ModelLoadError, match=r"does not match manifest\.json"):  # a swapped parity file is caught
        gate.read_parity_set(d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"][gate.PARITY_FILE] = file_record(d / gate.PARITY_FILE)
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"token agreement \d+\.\d+% < 99\.5%"):
        CompiledRuntime.load(d, eager_cpu=True, max_batch_size=8)
    with pytest.raises(ModelLoadError, match="ONNX Runtime fp32"):
        ModelRuntime.load(d, device="cpu").check_parity()


@pytest.mark.parametrize("n", [1, 3, 4])
def test_staging_pads_with_the_last_item_in_the_buffers_dtype(n: int) -> None:
    """What a CUDA graph's call copies into its pinned input (`compiled.stage`, numpy: no OpenMP spin):
    the items, then the last one repeated up to the graph's batch, cast to the graph's dtype."""
    from models.runtime.compiled import stage

    rng = np.random.default_rng(n)
    host = rng.integers(0, 16384, size=(n, 2, 3), dtype=np.int64)[:, ::-1]  # not contiguous, not the buffer's dtype
    buffer = np.full((4, 2, 3), -1, dtype=np.int32)
    stage(host, buffer)
    expected = np.concatenate([host, np.repeat(host[-1:], 4 - n, axis=0)]).astype(np.int32)
    np.testing.assert_array_equal(buffer, expected)


@pytest.mark.parametrize("n", [24, 37, 64])
def test_staging_a_large_batch_in_parallel_parts_gives_the_same_buffer(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of several MiB is copied in parts by the helper threads and the caller (numpy lets go of
    the GIL while copying); every part lands where one copy would have put it, also when the helpers'
    pool is shut down (the interpreter exiting: the caller copies the rest)."""
    from concurrent.futures import ThreadPoolExecutor

    import models.runtime.compiled
    from models.runtime.compiled import stage

    monkeypatch.setattr(models.runtime.compiled, "STAGE_THREADS", 4)  # four parts whatever this machine's cores
    host = np.random.default_rng(n).integers(0, 256, size=(n, 256, 256, 3), dtype=np.uint8)
    assert host.nbytes // (1 << 21) >= 2  # large enough to be split
    one = np.zeros((64, 256, 256, 3), np.uint8)
    stage(host, one)
    np.testing.assert_array_equal(one[:n], host)
    np.testing.assert_array_equal(one[n:], np.broadcast_to(host[-1], (64 - n, 256, 256, 3)))
    with ThreadPoolExecutor(3) as helpers:
        parallel = np.zeros_like(one)
        stage(host, parallel, helpers)
        np.testing.assert_array_equal(parallel, one)
    shut = np.zeros_like(one)
    stage(host, shut, helpers)  # shut down by the `with`: submit raises
    np.testing.assert_array_equal(shut, one)


def test_the_compile_mode_reaches_the_compiled_runtime(model_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compile-mode` (Settings) -> the repository's loader -> `load_runtime` -> `CompiledRuntime.load`, which
    refuses a mode it does not know; ONNX Runtime ignores it."""
    import models.runtime.compiled
    from service.metrics import Metrics
    from service.repository import ModelRepository
    from service.settings import Settings

    seen: list[str] = []
    real_load = models.runtime.compiled.CompiledRuntime.load

    def load(model_dir: Path, **kw: Any) -> Any:
        seen.append(kw["compile_mode"])
        return real_load(model_dir, eager_cpu=True, max_batch_size=kw["max_batch_size"], compile_mode=kw["compile_mode"])

    monkeypatch.setattr(runtimes, "gpu_visible", lambda: True)
    monkeypatch.setattr(models.runtime.compiled, "compiled_available", lambda: None)
    monkeypatch.setattr(models.runtime.compiled.CompiledRuntime, "load", load)
    repo = ModelRepository(Settings(model_repo=model_repo, compile_mode="max-autotune"), Metrics())
    rt = repo._loader(model_repo / "fsq4", name="fsq4", device="auto", precision="auto", intra_op_threads=None, max_batch_size=4)
    assert isinstance(rt, models.runtime.compiled.CompiledRuntime) and seen == ["max-autotune"]
    with pytest.raises(ModelLoadError, match="compile_mode must be one of"):
        real_load(model_repo / "fsq4", eager_cpu=True, compile_mode="max-autotune-no-cudagraphs")
    assert isinstance(load_runtime(model_repo / "fsq4", runtime="onnxruntime", compile_mode="max-autotune"), ModelRuntime)


@pytest.mark.parametrize(("mode", "passed"), [("default", {}), ("max-autotune", {"mode": "max-autotune-no-cudagraphs"})])
def test_compiled_graphs_compile_in_the_mode_asked(
    mode: str, passed: dict[str, str], model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max-autotune is torch.compile's max-autotune-no-cudagraphs: the runtime captures its own CUDA graphs."""
    import torch

    import models.export.compiled as compiled
    from models.tokenizer import Tokenizer

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(compiled, "configure_inductor", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    tok = Tokenizer.from_pretrained(model_repo / "fsq4").eval()
    compiled.compiled_graphs(tok, torch.device("cpu"), mode=mode)
    assert calls == [{"dynamic": False, **passed}] * 2
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compiled.compiled_graphs(tok, torch.device("cpu"), mode="reduce-overhead")


def test_the_compiled_runtimes_fallback_device_is_said_in_its_own_words(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a GPU host with CPU-only onnxruntime the fallback runs on the CPU, and the log says so of the
    fallback, not ONNX Runtime's "a GPU is visible ... serving on the CPU" (seen on the H200 while the
    model was served on the GPU)."""
    pytest.importorskip("torch")
    from models.runtime import compiled

    monkeypatch.setattr(compiled, "cuda_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="models.runtime.compiled"):
        assert compiled.fallback_device(eager_cpu=False) == "cpu"
    assert "fallback for image sizes not warmed runs on the CPU" in caplog.text
    monkeypatch.setattr(compiled, "cuda_available", lambda: True)
    assert compiled.fallback_device(eager_cpu=False) == "cuda"
    assert compiled.fallback_device(eager_cpu=True) == "cpu"


def test_the_compiled_runtime_falls_back_to_float32_where_float16_fails_its_gate(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """precision="auto": fp16 networks first; where they fail the parity gate (dense low-dimensional
    codebooks: imported MoVQ-style models), fp32 networks with TF32 off, the fallback's sessions kept.
    A precision asked for that fails is refused with the gate's numbers; an unknown one by name."""
    import models.export.compiled as export_compiled
    import models.runtime.compiled as compiled
    from models.core import gate

    asked: list[str] = []
    real_graphs = export_compiled.compiled_graphs

    def graphs(tok: Any, device: Any, **kw: Any) -> Any:
        asked.append(kw["precision"])
        return real_graphs(tok, device, **kw)

    real_enforce = gate.enforce
    verdicts = iter([False, True])  # the first measurement fails, the second passes

    def enforce(figures: dict[str, float], what: str, bounds: Any = gate.GPU_PARITY) -> None:
        if not next(verdicts):
            real_enforce({**figures, "token_agreement": 0.98}, what, bounds)

    monkeypatch.setattr(export_compiled, "compiled_graphs", graphs)
    monkeypatch.setattr(gate, "enforce", enforce)
    d = model_repo / "fsq4"
    with caplog.at_level(logging.WARNING, logger="models.runtime.compiled"):
        rt = compiled.CompiledRuntime.load(d, eager_cpu=True, max_batch_size=4)
    assert asked == ["fp16", "fp32"]
    assert "token agreement 98.0000% < 99.5%" in caplog.text and "compiling the fp32 networks (TF32 off) instead" in caplog.text
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert rt.encode(images).shape == (2, 32 // rt.info.downsample, 32 // rt.info.downsample)  # the fallback still open

    asked.clear()
    verdicts = iter([False])
    with pytest.raises(ModelLoadError, match=r"compiled runtime \(fp32\).*token agreement 98"):
        compiled.CompiledRuntime.load(d, eager_cpu=True, max_batch_size=4, precision="fp32")
    assert asked == ["fp32"]
    with pytest.raises(ModelLoadError, match="precision is auto, fp16 or fp32; got precision='bf16'"):
        compiled.CompiledRuntime.load(d, eager_cpu=True, precision="bf16")


def test_fp32_compiled_graphs_say_so_and_switch_tf32_off_while_they_run() -> None:
    """`precision_flags`: TF32 off inside for fp32 graphs on CUDA, the switches put back after; fp16
    graphs leave them alone; an unknown precision is refused by name."""
    import torch

    from models.export.compiled import CompiledGraphs, compiled_graphs, precision_flags

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with precision_flags(CompiledGraphs(abs, abs, "fp32", True, tf32_off=True)):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with precision_flags(CompiledGraphs(abs, abs, "fp16", True)):
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    with pytest.raises(ValueError, match="precision must be one of fp16, fp32, got 'bf16'"):
        compiled_graphs(None, torch.device("cpu"), compile=False, precision="bf16")  # type: ignore[arg-type]


def test_onnxruntime_runs_the_fp32_graphs_on_cuda_without_tf32() -> None:
    """The CUDA EP turns TF32 on by default, which rounds the exact graphs' convolutions to 10 mantissa
    bits; the fp32 sessions ask for it off (a caller's own setting wins), the fp16 ones leave it."""
    from models.runtime.onnx import session_cuda_options

    assert session_cuda_options("fp32")["use_tf32"] == "0"
    assert "use_tf32" not in session_cuda_options("fp16")
    assert session_cuda_options("fp32", {"use_tf32": "1"})["use_tf32"] == "1"
    assert session_cuda_options("fp32")["cudnn_conv_algo_search"] == "EXHAUSTIVE"  # the rest as before


def test_the_compiled_runtime_keeps_serving_when_onnxruntime_on_the_gpu_misses_its_gate(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The compiled runtime's ONNX Runtime fallback (image sizes nobody warmed) on CUDA that misses the
    parity gate is loaded on the CPU instead, with a warning, rather than the model not being served
    compiled (seen on an H100: an imported model whose CUDA EP fp32 graphs ran in TF32)."""
    from models.runtime import compiled

    real_load = ModelRuntime.load
    devices: list[str] = []

    def load(model_dir: Path, **kw: Any) -> ModelRuntime:
        devices.append(kw["device"])
        if kw["device"] == "cuda":
            raise ModelLoadError(
                "ONNX Runtime fp32 on CUDAExecutionProvider for fsq4 does not reproduce ...: token agreement 67.7% < 99.5%"
            )
        return real_load(model_dir, **kw)

    monkeypatch.setattr(compiled, "fallback_device", lambda eager_cpu: "cuda")
    monkeypatch.setattr(compiled.ModelRuntime, "load", load)
    with caplog.at_level(logging.WARNING, logger="models.runtime.compiled"):
        rt = compiled.CompiledRuntime.load(model_repo / "fsq4", eager_cpu=True, max_batch_size=4)
    assert devices == ["cuda", "cpu"] and rt.fallback.device == "cpu"
    assert "67.7% < 99.5%; the compiled runtime's fallback for image sizes not warmed runs on the CPU" in caplog.text
