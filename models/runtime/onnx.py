"""ONNX Runtime inference for exported model directories.

Torch-free: the service, the client's local backend and dataset tokenization share it. The model
directory is read and verified by `models.core.artefacts` (manifest, hashes, precision rule) before
any session is built, so a truncated or swapped file is a clear `ModelLoadError`, never a crash
inside ONNX Runtime.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from models.core import gate
from models.core.artefacts import Device, ExportedModel, ModelInfo, Precision, open_exported
from models.core.errors import InvalidInputError, ModelLoadError

log = logging.getLogger(__name__)

__all__ = [
    "Device",
    "InvalidInputError",
    "ModelInfo",
    "ModelLoadError",
    "ModelRuntime",
    "Precision",
    "batch_buckets",
    "configure_cuda_memory",
    "cuda_available",
]


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelLoadError("onnxruntime is not installed: pip install 'vqtok[cpu]' (or 'vqtok[gpu]' on a CUDA machine)") from exc
    return ort


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in _import_ort().get_available_providers()


def gpu_visible() -> bool:
    """An NVIDIA GPU and its driver are present on this host (whatever the installed runtimes can use)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


_warned_gpu = False


def _warn_unused_gpu() -> None:
    """One clear warning per process when device=auto falls back to the CPU on a host with a GPU."""
    global _warned_gpu
    if not _warned_gpu and gpu_visible():
        _warned_gpu = True
        ort = _import_ort()
        log.warning(
            "an NVIDIA GPU is visible but this onnxruntime %s has no CUDAExecutionProvider (providers: %s): serving on the CPU. "
            "Install the GPU runtime: pip uninstall -y onnxruntime && pip install 'vqtok[gpu]' (scripts/setup.sh does this when it sees a GPU)",
            ort.__version__,
            ", ".join(ort.get_available_providers()),
        )


def session_options(intra_op_threads: int | None, spin: bool = True, cpu_arena: bool = True) -> Any:
    """Full graph optimisation; `spin=False` stops idle ORT worker threads from busy-waiting, which
    a server needs on CPU so that its own threads (HTTP, image decoding) keep their cores.

    `cpu_arena=False`: host memory comes from malloc and goes back when a run ends. ONNX Runtime's CPU
    arena (one per session: encoder and decoder each) keeps the largest run's memory for ever and
    grows in powers of two, and a later run of the same shape (which allocates its memory pattern in
    one block) extends it again: a server's resident memory would only ever grow. Without the arena the
    memory goes back after each run, and its peak is lower than with a shrinking arena; the price is
    some CPU time (pages are faulted in afresh each run), as much as a shrinking arena costs. The memory
    pattern stays on: without it peaks drop only a little further, for far more CPU per encode.
    Figures: BENCHMARKS.md, "Memory"."""
    ort = _import_ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = cpu_arena
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


@dataclass(frozen=True)
class CudaMemory:
    """How ONNX Runtime's CUDA sessions hold device memory (process-wide; `configure_cuda_memory`).

    - `limit_bytes`: the CUDA EP's `gpu_mem_limit`, per arena; an allocation past it fails, and that
      batch answers 503 out-of-memory instead of the process taking the whole device.
    - `shared_arena`: one arena per device for every session that opts in (every per-shape session of
      every model), registered with ORT's environment (`create_and_register_allocator_v2`, ORT ≥ 1.16,
      + session config `session.use_env_allocators`), growing by what is asked (kSameAsRequested) and
      capped by `limit_bytes`; the default is one arena per session, each keeping its own peak. If the
      registration fails, sessions keep their own arenas (logged)."""

    limit_bytes: int | None = None
    shared_arena: bool = False


_cuda_memory = CudaMemory()
_shared_cuda_arenas: dict[str, bool] = {}  # device id -> registered (False: the registration failed)
_shared_arena_lock = threading.Lock()


def configure_cuda_memory(limit_bytes: int | None = None, shared_arena: bool = False) -> None:
    """Set how CUDA sessions built from now on hold device memory (see `CudaMemory`). A shared arena is
    registered once per device for the life of the process: its limit is the one set when the first
    session that used it was built."""
    global _cuda_memory
    _cuda_memory = CudaMemory(limit_bytes, shared_arena)


def _shared_cuda_arena(device_id: str) -> bool:
    """Register (once) the shared CUDA arena of `device_id`; whether sessions can use it."""
    with _shared_arena_lock:
        if device_id not in _shared_cuda_arenas:
            ort = _import_ort()
            limit = _cuda_memory.limit_bytes
            cfg: dict[str, int] = {"arena_extend_strategy": 1}  # kSameAsRequested
            options = {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested"}
            if limit:
                cfg["max_mem"] = limit
                options["gpu_mem_limit"] = str(limit)
            try:
                info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, int(device_id), ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, options, ort.OrtArenaCfg(cfg))
                _shared_cuda_arenas[device_id] = True
                log.info("one CUDA memory arena for every session on device %s (limit %s bytes)", device_id, limit or "none")
            except Exception as exc:  # an ORT without the API, or one that refuses it for this EP
                _shared_cuda_arenas[device_id] = False
                log.warning("no shared CUDA memory arena (%s); each session keeps its own", exc)
        return _shared_cuda_arenas[device_id]


def cuda_provider_options(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """CUDA EP settings for a server whose request shapes vary.

    - EXHAUSTIVE cuDNN search: the fastest convolution algorithms, chosen once per session (the
      runtime keeps one session per input shape on CUDA, built in warm-up).
    - kSameAsRequested arena growth: no power-of-two over-allocation as shapes change.
    - default cuDNN workspace limit: the max-workspace option does not make this model faster
      (bench/ort_profile.py --shape-probe) and each per-shape session would hold its own large
      workspace.
    - `gpu_mem_limit` from `configure_cuda_memory` (vqtok serve --gpu-mem-limit-gib), when set.
    """
    opts = {
        "device_id": os.environ.get("VQTOK_CUDA_DEVICE", "0"),
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_use_max_workspace": "0",
        "do_copy_in_default_stream": "1",
    }
    if _cuda_memory.limit_bytes:
        opts["gpu_mem_limit"] = str(_cuda_memory.limit_bytes)
    opts.update(overrides or {})
    return opts


def session_cuda_options(precision: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """`cuda_provider_options` for the graphs of `precision`: the fp32 graphs with TF32 off.

    The fp32 graphs are the exact ones (the gate's fallback from fp16), but the CUDA EP's default TF32
    convolutions round their inputs to 10 mantissa bits, enough to move many tokens of a model whose
    codes are dense in a low code dimension (BENCHMARKS.md, "Imported models on the GPU").
    `overrides` (the caller's) win."""
    return cuda_provider_options({"use_tf32": "0", **(overrides or {})} if precision == "fp32" else overrides)


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a padding runtime runs: 1, 2, 3, 4, 6, 8, 12, 16, … and `max_batch_size`.

    Each step is at most 1.5× the one before, so padding a batch up to its bucket wastes at most a
    third of the work, and there are few enough shapes (12 up to 64) to warm every one at load.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    sizes = {max_batch_size}
    p = 1
    while p < max_batch_size:
        sizes.add(p)
        if p >= 2 and p * 3 // 2 < max_batch_size:
            sizes.add(p * 3 // 2)
        p *= 2
    return tuple(sorted(sizes))


def check_images(images: np.ndarray, f: int) -> None:
    """What every runtime accepts: uint8 (B, H, W, 3), H and W positive multiples of f."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", type(images).__name__)
        raise InvalidInputError(f"expected uint8 images (B, H, W, 3), got {shape}")
    if images.dtype != np.uint8:
        raise InvalidInputError(f"expected uint8 images, got dtype {images.dtype}")
    b, h, w, _ = images.shape
    if b == 0 or h == 0 or w == 0 or h % f or w % f:
        raise InvalidInputError(f"image height and width must be positive multiples of {f} (got {h}x{w}, batch {b})")


def check_tokens(tokens: np.ndarray, codebook_size: int) -> np.ndarray:
    """Validated int32 copy-free view of `tokens` (B, h, w) with ids in [0, K)."""
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 3:
        shape = getattr(tokens, "shape", type(tokens).__name__)
        raise InvalidInputError(f"expected token ids (B, h, w), got {shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise InvalidInputError(f"token ids must be integers, got dtype {tokens.dtype}")
    if 0 in tokens.shape:
        raise InvalidInputError(f"token grid must be non-empty, got {tokens.shape}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= codebook_size:
        raise InvalidInputError(f"token ids must lie in [0, {codebook_size}), got [{lo}, {hi}]")
    return np.ascontiguousarray(tokens, dtype=np.int32)


class ShapeSessions:
    """One ORT session per input shape for one graph, created on first use, least recently used
    dropped past `capacity`. Each session only ever sees its own shape (see `ModelRuntime`).

    A shape whose session cannot be built (on a GPU: no device memory left for it) is logged once
    and remembered: `get` then answers None for it without trying again."""

    def __init__(self, factory: Callable[[], Any], capacity: int = 24, name: str = "graph") -> None:
        self._factory = factory
        self._capacity = capacity
        self._name = name
        self._sessions: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._failed: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...]) -> Any | None:
        with self._lock:  # creation under the lock: two threads never build the same shape twice
            if shape in self._failed:
                return None
            session = self._sessions.get(shape)
            if session is None:
                try:
                    session = self._factory()
                except Exception as exc:
                    self._failed.add(shape)
                    first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
                    log.warning(
                        "no ONNX Runtime session of its own for %s input shape %s (%s); the shared session "
                        "serves it, re-selecting its cuDNN algorithms when shapes change",
                        self._name,
                        shape,
                        first_line,
                    )
                    return None
                self._sessions[shape] = session
                if len(self._sessions) > self._capacity:
                    dropped, _ = self._sessions.popitem(last=False)
                    log.info("dropped the ONNX Runtime session for shape %s (more than %d shapes)", dropped, self._capacity)
            self._sessions.move_to_end(shape)
            return session

    def reserve(self, n: int) -> None:
        """Keep room for at least `n` shapes (warm-up calls this, so warmed sessions are not evicted)."""
        with self._lock:
            self._capacity = max(self._capacity, n)

    def shapes(self) -> list[tuple[int, ...]]:
        with self._lock:
            return list(self._sessions)

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()


class ModelRuntime:
    """One exported model directory, two ORT sessions (encoder, decoder).

    `encode` and `decode` are thread-safe (ORT sessions are; each call binds its own IO).

    On CUDA the runtime avoids ONNX Runtime's per-shape cost: the CUDA EP redoes its cuDNN algorithm
    choice whenever a session's input shape differs from its previous run, even for shapes it has run
    before, and that search costs far more than the run itself (bench/ort_profile.py --shape-probe;
    BENCHMARKS.md). A server whose batch sizes vary from batch to batch would pay it on most batches.
    So on CUDA (by default):
    - batch padding: only the sizes of `batch_buckets(max_batch_size)` run; a batch is padded
      (repeating its last item) up to the next bucket, the padding's outputs are dropped, and a
      batch above the largest bucket runs in chunks. The network treats images independently
      (GroupNorm, per-image attention), so results are unchanged;
    - one session per input shape (`ShapeSessions`), so no session ever switches shape; `warmup`
      builds the sessions of every bucket for the given image sizes. Each session holds its own
      CUDA memory arena; where one cannot be built (device memory), the shared session serves that
      shape, slower.
    """

    def __init__(
        self,
        model_dir: Path,
        info: ModelInfo,
        encoder: Any,
        decoder: Any,
        providers: list[str],
        buckets: tuple[int, ...] | None = None,
        per_shape: Mapping[str, ShapeSessions] | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.info = info
        self.providers = providers
        self.buckets = buckets  # None: every batch runs at its own size
        self._sessions = {"encoder": encoder, "decoder": decoder}
        self.closed = False
        self._per_shape = dict(per_shape) if per_shape else None  # graph -> sessions by input shape
        self._on_cuda = providers[0] == "CUDAExecutionProvider"
        self.device = "cuda" if self._on_cuda else "cpu"
        self.runtime_name = f"onnxruntime {_import_ort().__version__}"

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        name: str | None = None,
        device: Device = "auto",
        precision: Precision = "auto",
        intra_op_threads: int | None = None,
        cuda_options: Mapping[str, str] | None = None,
        max_batch_size: int = 64,
        pad_batches: bool | None = None,
        session_per_shape: bool | None = None,
        cpu_arena: bool | None = None,
    ) -> ModelRuntime:
        """`pad_batches`: run only `batch_buckets(max_batch_size)` sizes; `session_per_shape`: one
        ORT session per input shape (see the class docstring). None = on when the model runs on
        CUDA, off on the CPU, where a shape costs nothing to change. `cpu_arena`: ONNX Runtime's CPU
        memory arena (see `session_options`); None = off on the CPU, so that memory goes back after
        each batch, on with CUDA, where it only holds small host tensors."""
        ort = _import_ort()
        if max_batch_size < 1:
            raise ModelLoadError(f"max_batch_size must be at least 1, got {max_batch_size}")
        model_dir = Path(model_dir)
        if device not in ("auto", "cuda", "cpu"):
            raise ModelLoadError(f"device must be auto, cuda or cpu, got {device!r}")
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if device == "cuda" and not has_cuda:
            raise ModelLoadError("device='cuda' but this onnxruntime has no CUDAExecutionProvider (pip install 'vqtok[gpu]')")
        use_cuda = device == "cuda" or (device == "auto" and has_cuda)
        if device == "auto" and not has_cuda:
            _warn_unused_gpu()
        exported: ExportedModel = open_exported(model_dir, precision=precision, on_cuda=use_cuda, name=name)
        info, graphs = exported.info, exported.graphs
        # On the GPU the CPU threads only feed the device; on the CPU a spinning pool would starve
        # the server's other threads between batches.
        opts = session_options(intra_op_threads, spin=use_cuda, cpu_arena=use_cuda if cpu_arena is None else cpu_arena)
        providers: list[Any] = ["CPUExecutionProvider"]
        if use_cuda:
            cuda = session_cuda_options(info.precision, cuda_options)
            providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
            if _cuda_memory.shared_arena and _shared_cuda_arena(cuda["device_id"]):
                opts.add_session_config_entry("session.use_env_allocators", "1")
        try:
            encoder = ort.InferenceSession(str(graphs["encoder"]), opts, providers=providers)
            decoder = ort.InferenceSession(str(graphs["decoder"]), opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types (InvalidProtobuf, Fail, …)
            raise ModelLoadError(f"ONNX Runtime could not load {model_dir}: {exc}") from exc
        _check_io(encoder, "images", "tokens", model_dir)
        _check_io(decoder, "tokens", "images", model_dir)
        active = list(encoder.get_providers())
        on_cuda = active[0] == "CUDAExecutionProvider"
        pad = on_cuda if pad_batches is None else pad_batches
        per_shape = None
        if on_cuda if session_per_shape is None else session_per_shape:
            per_shape = {
                part: ShapeSessions(partial(ort.InferenceSession, str(graphs[part]), opts, providers=providers), name=part)
                for part in ("encoder", "decoder")
            }
        runtime = cls(model_dir, info, encoder, decoder, active, batch_buckets(max_batch_size) if pad else None, per_shape)
        if on_cuda:
            try:
                runtime.check_parity()
            except ModelLoadError as exc:
                if precision != "auto" or info.precision == "fp32":
                    raise
                log.warning("%s; loading the fp32 graphs instead", exc)
                return cls.load(
                    model_dir,
                    name=name,
                    device=device,
                    precision="fp32",
                    intra_op_threads=intra_op_threads,
                    cuda_options=cuda_options,
                    max_batch_size=max_batch_size,
                    pad_batches=pad_batches,
                    session_per_shape=session_per_shape,
                    cpu_arena=cpu_arena,
                )
        log.info(
            "loaded model %s from %s (%s, %s, batch sizes %s)",
            info.name,
            model_dir,
            info.precision,
            runtime.providers[0],
            ",".join(map(str, runtime.buckets)) if runtime.buckets else "any",
        )
        return runtime

    def check_parity(self) -> dict[str, float] | None:
        """The GPU gate: refuse (ModelLoadError with the numbers) a CUDA session that does not
        reproduce the CPU float32 reference on the model's parity photos."""
        parity = gate.read_parity_set(self.model_dir)
        if parity is None:
            log.warning("%s has no parity set (exported before parity.npz existed): its GPU sessions are not gated", self.model_dir)
            return None
        figures = gate.measure(self.encode, self.decode, parity)
        gate.enforce(figures, f"ONNX Runtime {self.info.precision} on {self.providers[0]} for {self.info.name}")
        return figures

    # --- validation ---

    def check_images(self, images: np.ndarray) -> None:
        check_images(images, self.info.downsample)

    def check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return check_tokens(tokens, self.info.codebook_size)

    # --- inference ---

    def _run(self, graph: str, input_name: str, array: np.ndarray) -> np.ndarray:
        if self.buckets is None:
            return self._run_session(self._session(graph, array), input_name, array)
        n, largest = len(array), self.buckets[-1]
        if n > largest:
            parts = [self._run(graph, input_name, array[i : i + largest]) for i in range(0, n, largest)]
            return np.concatenate(parts)
        size = next(b for b in self.buckets if b >= n)
        if size > n:
            filler = np.broadcast_to(array[-1:], (size - n, *array.shape[1:]))
            array = np.concatenate([array, filler])
        return self._run_session(self._session(graph, array), input_name, array)[:n]

    def _session(self, graph: str, array: np.ndarray) -> Any:
        own = None if self._per_shape is None else self._per_shape[graph].get(tuple(array.shape))
        return self._sessions[graph] if own is None else own

    def session_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """Input shapes with a session of their own, per graph (empty without per-shape sessions)."""
        return {g: s.shapes() for g, s in (self._per_shape or {}).items()}

    def close(self) -> None:
        """Drop the sessions and with them their memory arenas (host and device): a retired model
        version hands its memory back. The runtime cannot run afterwards."""
        for sessions in (self._per_shape or {}).values():
            sessions.clear()
        self._sessions.clear()
        self.closed = True

    def _run_session(self, session: Any, input_name: str, array: np.ndarray) -> np.ndarray:
        if not self._on_cuda:
            return session.run(None, {input_name: array})[0]
        # IO binding: the output stays in a device buffer ORT allocates for it and comes back in
        # one copy, instead of ORT's default device->host staging through its own allocation.
        binding = session.io_binding()
        binding.bind_cpu_input(input_name, array)
        binding.bind_output(session.get_outputs()[0].name, "cuda")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> int32 token ids (B, H/f, W/f)."""
        self.check_images(images)
        return self._run("encoder", "images", np.ascontiguousarray(images))

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """integer token ids (B, h, w) in [0, K) -> uint8 images (B, h·f, w·f, 3)."""
        return self._run("decoder", "tokens", self.check_tokens(tokens))

    def warmup(
        self, sizes: Sequence[tuple[int, int]], batch_sizes: Sequence[int] | None = None, parts: Sequence[str] = ("encode", "decode")
    ) -> None:
        """Run each (batch, size) once so cuDNN algorithm search and arena growth happen now.

        `batch_sizes` None: every bucket of a padding runtime (all the shapes it can run), else 1.
        `parts`: the graphs to run ("encode", "decode")."""
        rng = np.random.default_rng(0)
        f = self.info.downsample
        if batch_sizes is None:
            batch_sizes = self.buckets or (1,)
        for sessions in (self._per_shape or {}).values():
            sessions.reserve(2 * len(sizes) * len(batch_sizes))  # the warmed shapes, and as many others
        for h, w in sizes:
            for b in batch_sizes:
                if "encode" in parts:
                    self.encode(rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8))
                if "decode" in parts:
                    self.decode(rng.integers(0, self.info.codebook_size, size=(b, h // f, w // f), dtype=np.int32))


def _check_io(session: Any, input_name: str, output_name: str, model_dir: Path) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [input_name] or outputs != [output_name]:
        raise ModelLoadError(
            f"{model_dir}: graph has inputs {inputs} and outputs {outputs}, expected [{input_name!r}] -> [{output_name!r}]"
        )
