"""The runtimes that can serve a model directory, and the rule that picks one.

- `onnxruntime` (`onnx.ModelRuntime`): the portable runtime, CPU everywhere, CUDA where
  onnxruntime-gpu is installed; torch-free.
- `compiled` (`compiled.CompiledRuntime`): torch.compile + CUDA graphs + the fused code search;
  needs torch with CUDA; imported only when chosen.

Both answer the same contract, `base.Runtime`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from models.core.artefacts import Device, Precision
from models.core.errors import ModelLoadError

from .base import Runtime
from .onnx import ModelRuntime, gpu_visible

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnxruntime", "compiled")


def load_runtime(
    model_dir: str | Path,
    *,
    runtime: str = "auto",
    name: str | None = None,
    device: Device = "auto",
    precision: Precision = "auto",
    intra_op_threads: int | None = None,
    max_batch_size: int = 64,
    compile_mode: str = "default",
) -> Runtime:
    """The runtime that serves `model_dir`: "onnxruntime", "compiled" (torch.compile + CUDA graphs +
    the fused search; needs torch with CUDA), or "auto": the compiled runtime on a CUDA host where it
    can run and passes its parity gate, else ONNX Runtime: where both run, the compiled runtime is the
    faster at every batch size (BENCHMARKS.md). A forced runtime that cannot run is a ModelLoadError.
    `compile_mode` ("default", "max-autotune") is the compiled runtime's; ONNX Runtime ignores it."""
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    common: dict[str, Any] = dict(name=name, device=device, intra_op_threads=intra_op_threads, max_batch_size=max_batch_size)
    if runtime == "onnxruntime":
        return ModelRuntime.load(model_dir, precision=precision, **common)
    if runtime == "compiled" or (runtime == "auto" and device != "cpu" and precision == "auto" and gpu_visible()):
        from .compiled import CompiledRuntime, compiled_available  # imports no torch until used

        why = compiled_available()
        if runtime == "compiled" or why is None:
            try:
                return CompiledRuntime.load(model_dir, precision=precision, compile_mode=compile_mode, **common)
            except ModelLoadError as exc:
                if runtime == "compiled":
                    raise
                log.warning("the compiled runtime cannot serve %s (%s); serving it with ONNX Runtime", model_dir, exc)
                try:
                    return ModelRuntime.load(model_dir, precision=precision, **common)
                except ModelLoadError as ort_exc:  # both reasons: the first is often the one to act on
                    raise ModelLoadError(f"no runtime can serve it: compiled: {exc}; ONNX Runtime: {ort_exc}") from ort_exc
        else:
            log.info("compiled runtime unavailable (%s); serving %s with ONNX Runtime", why, model_dir)
    return ModelRuntime.load(model_dir, precision=precision, **common)
