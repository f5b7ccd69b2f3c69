"""The compiled GPU runtime: the export graphs under `torch.compile` (static shapes), each shape
replayed as a CUDA graph, the code search fused into one Triton kernel.

Why it exists: ONNX Runtime's CUDA EP runs this model's small-channel convolutions well below what
compiled PyTorch does, and pays a per-call overhead that dominates small batches (BENCHMARKS.md,
"Serving on the GPU"). The networks run in float16 with cuDNN's per-shape algorithm search, which
keeps the tokens within the parity gate where bfloat16 does not, and the search in float32-accurate
3×TF32 inside the Triton kernel. A model whose float16 networks fail the gate (dense codes in a low
code dimension, as in imported MoVQ-style models) is compiled again in float32 with TF32 off, as ONNX
Runtime falls back to its fp32 graphs.

Shapes: each (batch, height, width) is compiled and captured once, in `warmup`, and a batch is padded
(repeating the last item) up to the smallest warmed batch size of its image size that holds it. By
default the warmed sizes are the powers of two up to `max_batch_size` (at most 2× padding, few
shapes); `warmup_batch_sizes` warms others (e.g. 1,2,4,8,12,16,24,32,48,64: at most 1.5× padding, ten
shapes a size). A tokenization job warms only its batch size: its few short batches cost one full
batch each, its start-up one graph instead of seven. An
image size nobody warmed runs on the ONNX Runtime `fallback` (same tokens within the parity bounds),
so no request ever waits for a compile. Compiled kernels persist in Inductor's cache (`$VQTOK_CACHE/
inductor`): the first start compiles every warmed shape (minutes in all), later starts load them.

This module is the service's one door to torch: it is imported only when the compiled runtime is
chosen (`load_runtime`), never by the torch-free serving install. The layering contract lists the
exception.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from models.core import gate
from models.core.artefacts import Device, ModelInfo, open_exported
from models.core.errors import InvalidInputError, ModelLoadError

from .onnx import ModelRuntime, check_images, check_tokens, cuda_available

log = logging.getLogger(__name__)


def compiled_available() -> str | None:
    """None when this process can run the compiled runtime, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (the compiled runtime needs torch with CUDA: pip install 'vqtok[torch]')"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (it ships with torch's CUDA wheels)"
    return None


def fallback_device(eager_cpu: bool) -> Device:
    """Where the ONNX Runtime fallback (image sizes nobody warmed) runs: CUDA where onnxruntime-gpu is
    installed, else the CPU, said in its own words (device="auto" would log ONNX Runtime's "a GPU is
    visible ... serving on the CPU", which reads as if the whole model were served on the CPU)."""
    if eager_cpu:
        return "cpu"
    if cuda_available():
        return "cuda"
    log.info("the compiled runtime's fallback for image sizes not warmed runs on the CPU (this onnxruntime has no CUDA provider)")
    return "cpu"


def power_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, … up to `max_batch_size` (and it): each is one compiled shape per image size, so
    few shapes (a first start compiles each), at most 2× padding."""
    sizes = {max_batch_size}
    p = 1
    while p < max_batch_size:
        sizes.add(p)
        p *= 2
    return tuple(sorted(sizes))


_capture_streams: dict[int, tuple[Any, threading.Lock]] = {}
_capture_streams_lock = threading.Lock()


def capture_stream(device: Any) -> tuple[Any, threading.Lock]:
    """The one side stream of this process on `device` that every warm-up and capture runs on, and the
    lock that keeps two captures (two models loading, or a reload) off it at once.

    One stream, not one per graph: cuBLAS keeps a workspace per (handle, stream) for the life of the
    process (PyTorch's cuBLAS handle pool), so a fresh stream per captured shape would leave a
    workspace behind for every graph of every version that ever loaded, and each reload would grow the
    device memory by one workspace per graph. With one stream a reload leaves nothing behind
    (bench/reload_memory.py checks it on a GPU)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    with _capture_streams_lock:
        entry = _capture_streams.get(index)
        if entry is None:
            entry = _capture_streams[index] = (torch.cuda.Stream(device=index), threading.Lock())
        return entry


class _Graph:
    """One compiled shape captured as a CUDA graph: static input and output buffers on the device.

    A call stages its images in pinned host memory (padding the batch up to the graph's size there),
    then, under `lock`, only *enqueues* its work on the device's stream: the copy in, the replay and
    the copy out to pinned memory; it waits for the result after letting go of the lock. Everything
    runs in order on one stream, so calls from several threads (the batcher's workers, a tokenization
    job's encode threads) keep the device busy back to back: one batch's host work (staging, its
    answer) overlaps the other's replay. A lock over the whole call, copies and the wait included,
    would run one batch at a time with the device idle between batches.

    `lock` is one for every graph of the memory pool, not one per graph: graphs captured into one pool
    reuse each other's intermediate memory (a later capture may place its output where an earlier
    graph keeps intermediates), so between one graph's replay and its copy out no other graph of the
    pool may run. Holding the pool's lock while enqueueing the three steps keeps them adjacent on the
    stream. (With a lock per graph, two threads decoding at two batch sizes get each other's pixels;
    tests/service/test_compiled_cuda.py checks it on a GPU.)"""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        example: Any,
        pool: Any,
        lock: threading.Lock,
        flags: Callable[[], AbstractContextManager[None]] = nullcontext,
    ) -> None:
        """`flags`: the precision switches the compile, warm-up and capture run under (`precision_flags`)."""
        import torch

        self.input = example.clone()
        self.lock = lock
        self.fn, self.graph = fn, None
        if example.device.type != "cuda":  # the eager CPU mode (tests): no capture
            return
        # Warm-up and capture on the same stream: the warm-up allocates its cuBLAS workspace in the
        # ordinary pool, and the capture finds it there instead of allocating one inside the graph's pool.
        stream, lock = capture_stream(example.device)
        with torch.cuda.device(example.device), lock, flags():  # current_stream and the capture's syncs: this device's
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(3):  # compile, autotune and settle before capture
                    fn(self.input)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: this capture forbids unsafe CUDA calls on this thread only. The default
            # (global) makes every other thread's synchronising call fail while it lasts: a reload
            # captures the new version's graphs while the old version serves, and its replies (a
            # device-to-host copy) then fail with "operation not permitted when stream is capturing".
            with (
                torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"),
                torch.no_grad(),
            ):
                self.output = fn(self.input)

    def run(self, host: np.ndarray) -> np.ndarray:
        """`host`: at most the graph's batch of items; the answer has as many (the rest is padding,
        copies of the last item)."""
        import torch

        n = len(host)
        if self.graph is None:
            with self.lock, torch.no_grad():
                stage(host, self.input.numpy())  # the eager CPU mode's input is a host tensor
                return self.fn(self.input).cpu().numpy()[:n]
        # Pinned blocks come from torch's caching host allocator: after the first calls, no allocation.
        staged = torch.empty(self.input.shape, dtype=self.input.dtype, pin_memory=True)
        stage(host, staged.numpy(), _stage_helpers())
        answer = torch.empty(self.output.shape, dtype=self.output.dtype, pin_memory=True)
        done = torch.cuda.Event(blocking=True)  # its waiter sleeps rather than spins a core
        # The device's default stream, named rather than taken as current: the ordering above holds only
        # if every call of the pool enqueues on the same stream, whatever stream its thread has set.
        stream = torch.cuda.default_stream(self.input.device)
        with torch.cuda.device(self.input.device), torch.cuda.stream(stream), self.lock:
            self.input.copy_(staged, non_blocking=True)
            self.graph.replay()
            answer.copy_(self.output, non_blocking=True)
            done.record(stream)
        done.synchronize()  # outside the lock: the next call enqueues its batch meanwhile
        # The answer stays in pinned memory (no copy): its block returns to torch's pinned cache when the
        # caller drops the last slice of it (a server copies decoded pixels out at once; `encode` copies
        # its small token grids). The cache keeps what it held at its peak (a few batches in flight: 16 MiB
        # blocks for a decode of 64 × 256², 64 MiB at 512²) for later calls.
        return answer.numpy()[:n]


STAGE_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
# ^ a large batch's copy into pinned memory: threads, the caller's included (within this process's CPUs)
_STAGE_PART_BYTES = 1 << 21  # but no part smaller than this: a thread hop costs more than copying 2 MiB
_stage_pool: ThreadPoolExecutor | None = None
_stage_pool_lock = threading.Lock()


def _stage_helpers() -> ThreadPoolExecutor | None:
    """The process's threads that help `stage` copy (idle threads block; they never spin); None on one core."""
    global _stage_pool
    with _stage_pool_lock:
        if _stage_pool is None and STAGE_THREADS > 1:
            _stage_pool = ThreadPoolExecutor(STAGE_THREADS - 1, thread_name_prefix="stage")
        return _stage_pool


def _forget_stage_helpers() -> None:
    """In a forked child: the parent's pool has no threads here, and its lock may be held."""
    global _stage_pool, _stage_pool_lock
    _stage_pool, _stage_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_stage_helpers)


def stage(host: np.ndarray, buffer: np.ndarray, helpers: ThreadPoolExecutor | None = None) -> None:
    """`host` (n ≤ len(buffer) items) into `buffer`, its last item repeated over the rest (the padding).

    With numpy, not torch's `copy_`, whose OpenMP workers spin for milliseconds after each copy
    (libgomp's default wait policy): a copy that takes a fraction of a millisecond then costs several
    milliseconds of CPU while the batch runs on the GPU, CPU that a split server's inference process
    takes from the fronts on the same cores. A large batch is still copied by several threads
    (`helpers` and the caller's; numpy lets go of the GIL while it copies), as torch's threads did, so
    that a lone caller's big batch does not wait for one thread's copy. Figures: BENCHMARKS.md."""
    n = len(host)
    parts = min(n, STAGE_THREADS, host.nbytes // _STAGE_PART_BYTES)
    if helpers is None or parts <= 1:
        buffer[:n] = host
    else:
        bounds = [n * i // parts for i in range(parts + 1)]
        copies = []
        for a, b in itertools.pairwise(bounds[1:]):
            try:
                copies.append(helpers.submit(buffer.__setitem__, slice(a, b), host[a:b]))
            except RuntimeError:  # the pool is shut down (the interpreter is exiting): this thread copies the rest
                buffer[a:n] = host[a:]
                break
        buffer[: bounds[1]] = host[: bounds[1]]
        for copy in copies:
            copy.result()
    if n < len(buffer):
        buffer[n:] = buffer[n - 1]


class CompiledRuntime:
    """The same contract as `ModelRuntime` (`encode`, `decode`, `warmup`, `info`, …)."""

    runtime_kind = "compiled"

    def __init__(
        self, model_dir: Path, info: ModelInfo, graphs: Any, device: Any, buckets: tuple[int, ...], fallback: ModelRuntime
    ) -> None:
        import torch

        self.model_dir = model_dir
        self.info = info
        self.buckets = buckets
        self.fallback = fallback
        self.device_handle = device
        self.device = device.type
        on_cuda = device.type == "cuda"
        self.runtime_name = f"{'compiled' if on_cuda else 'eager'} torch {torch.__version__}"
        self.providers = ["torch.compile+cudagraph", f"cuda:{device.index or 0}"] if on_cuda else ["torch-eager", "cpu"]
        self._graphs = graphs
        self._captured: dict[tuple[str, tuple[int, ...]], _Graph] = {}
        self._warmed: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}  # (part, item shape) -> batch sizes captured, ascending
        self._pool = torch.cuda.graph_pool_handle() if on_cuda else None  # one memory pool for every captured shape
        self._replay_lock = threading.Lock()  # the pool's: see _Graph
        self._capture_lock = threading.Lock()
        self.closed = False

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        name: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        intra_op_threads: int | None = None,
        max_batch_size: int = 64,
        eager_cpu: bool = False,
        compile_mode: str = "default",
    ) -> CompiledRuntime:
        """`eager_cpu`: the same graphs, padding and fallback on the CPU without compiling or CUDA
        graphs (tests check the runtime's contract with it); otherwise CUDA only. `compile_mode`:
        "default" or "max-autotune" (`models.export.compiled.compiled_graphs`: minutes a shape on an
        empty cache). `precision`: "fp16" or "fp32" networks, or "auto": float16, and float32 (TF32
        off) where float16 fails the parity gate; a precision asked for that fails it is refused."""
        if not eager_cpu:
            why = compiled_available()
            if why is not None:
                raise ModelLoadError(f"the compiled runtime cannot run here: {why}")
            if device == "cpu":
                raise ModelLoadError("the compiled runtime runs on CUDA only; use runtime=onnxruntime on the CPU")
        if precision not in ("auto", "fp16", "fp32"):
            raise ModelLoadError(f"the compiled runtime's precision is auto, fp16 or fp32; got precision={precision!r}")
        import torch

        from models.export.compiled import COMPILE_MODES, compiled_graphs
        from models.tokenizer import Tokenizer

        if compile_mode not in COMPILE_MODES:
            raise ModelLoadError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")

        model_dir = Path(model_dir)
        t0 = time.perf_counter()
        exported = open_exported(model_dir, precision="fp32", on_cuda=True, name=name)  # verifies the artefacts
        where = fallback_device(eager_cpu)
        try:
            fallback = ModelRuntime.load(
                model_dir, name=name, device=where, intra_op_threads=intra_op_threads, max_batch_size=max_batch_size
            )
        except ModelLoadError as exc:
            if where != "cuda":
                raise
            # ONNX Runtime on this GPU misses the parity gate: the image sizes nobody warmed run on the
            # CPU (slower, exact) rather than the model not being served compiled at all.
            log.warning("%s; the compiled runtime's fallback for image sizes not warmed runs on the CPU", exc)
            fallback = ModelRuntime.load(
                model_dir, name=name, device="cpu", intra_op_threads=intra_op_threads, max_batch_size=max_batch_size
            )
        dev = torch.device("cpu") if eager_cpu else torch.device("cuda", int(os.environ.get("VQTOK_CUDA_DEVICE", "0")))
        tok = Tokenizer.from_pretrained(model_dir).eval()
        rungs = ("fp16", "fp32") if precision == "auto" else (precision,)  # the eager CPU mode runs float32 in both
        for rung in rungs:
            graphs = compiled_graphs(tok, dev, compile=not eager_cpu, mode=compile_mode, precision=rung)
            info = ModelInfo(**{**exported.info.__dict__, "precision": graphs.precision})
            runtime = cls(model_dir, info, graphs, dev, power_buckets(max_batch_size), fallback)
            try:
                runtime.check_parity()
                break
            except ModelLoadError as exc:
                runtime.release_graphs()
                if rung == rungs[-1]:
                    fallback.close()
                    raise
                log.warning("%s; compiling the fp32 networks (TF32 off) instead", exc)
        log.info("compiled runtime (%s) for %s ready in %.1f s (before warm-up)", info.precision, info.name, time.perf_counter() - t0)
        return runtime

    # --- the GPU parity gate ---

    def close(self) -> None:
        """Drop the captured graphs, the compiled networks and the fallback's sessions, then hand the
        freed CUDA blocks back to the device (a retired version must not keep its memory while its
        successor runs). The runtime cannot run afterwards (bench/reload_memory.py measures what a
        closed version leaves allocated)."""
        self.release_graphs()
        self.fallback.close()
        self.closed = True

    def release_graphs(self) -> None:
        """Drop the captured graphs and the compiled networks and hand their CUDA blocks back (what
        `close` does, the fallback's sessions kept: a precision that failed the gate leaves them to
        the next)."""
        import torch

        with self._capture_lock:
            self._captured.clear()
            self._warmed.clear()
            self._graphs = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            host_empty_cache = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks no call holds (torch ≥ 2.5)
            if host_empty_cache is not None:
                host_empty_cache()

    def check_parity(self) -> dict[str, float] | None:
        parity = gate.read_parity_set(self.model_dir)
        if parity is None:
            log.warning("%s has no parity set (exported before parity.npz existed): the compiled runtime is not gated", self.model_dir)
            return None
        n, h, w = parity.images.shape[:3]
        self.warmup([(h, w)], [n])  # the gate measures the compiled graphs, not the fallback
        figures = gate.measure(self.encode, self.decode, parity)
        gate.enforce(figures, f"the compiled runtime ({self.info.precision}) of {self.info.name}")
        log.info("compiled runtime parity: %s", figures)
        return figures

    # --- inference ---

    def _warmed_bucket(self, part: str, item: tuple[int, ...], n: int) -> int | None:
        """The smallest captured batch size holding `n` items of shape `item`, if any."""
        return next((b for b in self._warmed.get((part, item), ()) if b >= n), None)

    def _graph(self, part: str, shape: tuple[int, ...], example: np.ndarray) -> _Graph:
        key = (part, shape)
        graph = self._captured.get(key)
        if graph is None:
            import torch

            with self._capture_lock:
                graph = self._captured.get(key)
                if graph is None:
                    from models.export.compiled import precision_flags

                    graphs = self._graphs
                    fn = graphs.encoder if part == "encode" else graphs.decoder
                    example_t = torch.from_numpy(example).to(self.device_handle)
                    graph = _Graph(fn, example_t, self._pool, self._replay_lock, lambda: precision_flags(graphs))
                    self._captured[key] = graph
                    item = (part, shape[1:])  # a new tuple, not changed in place: requests read it without the lock
                    self._warmed[item] = tuple(sorted({*self._warmed.get(item, ()), shape[0]}))
        return graph

    def _run(self, part: str, array: np.ndarray, fallback: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        n, largest = len(array), self.buckets[-1]
        if n > largest:
            return np.concatenate([self._run(part, array[i : i + largest], fallback) for i in range(0, n, largest)])
        size = self._warmed_bucket(part, array.shape[1:], n)
        if size is None:
            return fallback(array)  # never warmed: no compile inside a request
        return self._captured[(part, (size, *array.shape[1:]))].run(array)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> int32 token ids (B, H/f, W/f)."""
        check_images(images, self.info.downsample)
        # a copy (256 KiB for 64 × 256²): token grids live long (a tokenization job keeps a shard's until it
        # commits) and must not hold the pinned block they were copied into
        return self._run("encode", images, self.fallback.encode).astype(np.int32, copy=True)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """integer token ids (B, h, w) in [0, K) -> uint8 images (B, h·f, w·f, 3)."""
        return self._run("decode", check_tokens(tokens, self.info.codebook_size), self.fallback.decode)

    def warmup(
        self, sizes: Sequence[tuple[int, int]], batch_sizes: Sequence[int] | None = None, parts: Sequence[str] = ("encode", "decode")
    ) -> None:
        """Compile and capture every (batch size, size) now: `batch_sizes` (each capped at `max_batch_size`),
        by default the powers of two up to it; the ONNX fallback warms its own shapes. `parts`: the graphs
        to warm ("encode", "decode"; a tokenization job only encodes: half the compiles)."""
        f = self.info.downsample
        rng = np.random.default_rng(0)
        for h, w in sizes:
            for b in batch_sizes or self.buckets:
                size = min(b, self.buckets[-1])
                images = rng.integers(0, 256, size=(size, h, w, 3), dtype=np.uint8)
                tokens = rng.integers(0, self.info.codebook_size, size=(size, h // f, w // f), dtype=np.int32)
                if "encode" in parts:
                    self._graph("encode", images.shape, images)
                if "decode" in parts:
                    self._graph("decode", tokens.shape, tokens)

    def check_images(self, images: np.ndarray) -> None:
        check_images(images, self.info.downsample)

    def check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return check_tokens(tokens, self.info.codebook_size)

    def session_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        out: dict[str, list[tuple[int, ...]]] = {"encoder": [], "decoder": []}
        for part, shape in self._captured:
            out["encoder" if part == "encode" else "decoder"].append(shape)
        return out


__all__ = ["CompiledRuntime", "InvalidInputError", "compiled_available", "fallback_device", "power_buckets"]
