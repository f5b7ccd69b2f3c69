"""The model repository: a folder of exported model directories, one per model name.

`Repository` is what the routes see (entries, readiness, leases, metrics; the `Served` protocol of one
served version); `ModelRepository` loads and runs the models in this process. A front process of the
multi-process server has its own kind beside it (service/multiproc/front.py).

Every directory is loaded and warmed at start; one that cannot be loaded is refused with a log line
and listed as `failed`, and the others serve. A reload (admin route or SIGHUP) builds the new runtime
beside the old one and swaps it in only when it loaded and warmed; requests already holding the old
model (a *lease*) finish on it, and its batcher stops once the last of them is done. A broken new
version leaves the old one serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from prometheus_client import generate_latest

from models.core.artefacts import DEFAULT_MODEL, ModelInfo
from models.core.errors import ModelLoadError, ModelNotReady, UnknownModel
from models.runtime import Runtime, load_runtime
from models.runtime.onnx import configure_cuda_memory

from .batcher import Batcher, PixelPool, pixel_budget
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("vqtok.repository")

Loader = Callable[..., Runtime]  # signature of models.runtime.load_runtime


def batch_workers(settings: Settings, runtime: object) -> int:
    """Batches one model runs at once: the setting, else 2 on the compiled runtime (its calls overlap on
    the device: one batch is staged and queued while the other runs) and 1 on ONNX Runtime (whose
    session already uses every core on the CPU)."""
    if settings.batch_workers is not None:
        return settings.batch_workers
    return 2 if getattr(runtime, "runtime_kind", "") == "compiled" else 1


class ModelFacts(Protocol):
    """What the routes read of a served model's runtime (`models.runtime.Runtime` has it all)."""

    @property
    def info(self) -> ModelInfo: ...
    @property
    def device(self) -> str: ...
    @property
    def runtime_name(self) -> str: ...
    @property
    def providers(self) -> Sequence[str]: ...


class Queue(Protocol):
    """What the routes use of a served model's batcher: `Batcher` here, its stand-in in a front process."""

    @property
    def max_batch_pixels(self) -> int | None: ...
    @property
    def workers(self) -> int: ...
    @property
    def queued_images(self) -> int: ...

    async def submit(self, op: str, array: np.ndarray, deadline: float) -> np.ndarray: ...


class Served(Protocol):
    """One served version of a model, as a lease hands it to a request."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def runtime(self) -> ModelFacts: ...
    @property
    def batcher(self) -> Queue: ...
    @property
    def loaded_at(self) -> float: ...


@dataclass(eq=False)
class ServedModel:
    """A loaded runtime and its batcher; `active` counts the requests holding it."""

    name: str
    path: Path
    runtime: Runtime
    batcher: Batcher
    executor: ThreadPoolExecutor
    loaded_at: float = field(default_factory=time.time)
    active: int = 0
    retired: bool = False
    stopping: bool = False


@dataclass(eq=False)
class ModelEntry:
    name: str
    path: Path
    state: str = "loading"  # loading | ready | failed
    error: str | None = None  # why the last load or reload failed
    served: Served | None = None


def _release(served: ServedModel) -> None:
    """A retired version's memory back to the system: its inference threads finish, its runtime drops
    its sessions / compiled graphs (and torch's CUDA cache), then glibc returns freed heap pages
    (`malloc_trim`). Without the last step a reload under load leaves the server's RSS far higher:
    memory that ONNX Runtime freed but glibc kept (BENCHMARKS.md, "Memory")."""
    served.executor.shutdown(wait=True)
    close = getattr(served.runtime, "close", None)
    if close is not None:
        close()
    gc.collect()
    _malloc_trim()


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def discover(repo: Path) -> dict[str, Path]:
    """Model name -> directory. A repository is a folder of model directories; a single model
    directory (it holds manifest.json or config.json) is accepted as a repository of one."""
    if not repo.is_dir():
        return {}
    if (repo / "manifest.json").exists() or (repo / "config.json").exists():
        return {repo.name: repo}
    return {p.name: p for p in sorted(repo.iterdir()) if p.is_dir() and not p.name.startswith((".", "_"))}


def _runtime_labels(runtime: Any) -> tuple[str, str, str]:
    return str(getattr(runtime, "runtime_name", "")), str(getattr(runtime, "device", "")), str(runtime.info.precision)


class Repository(ABC):
    """The models a server answers for, as the routes see them: entries, readiness, leases, metrics. Two
    kinds: `ModelRepository` loads and runs them in this process; a front process of the multi-process
    server sees the inference process's (`service.multiproc.front.RemoteRepository`)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._entries: dict[str, ModelEntry] = {}
        self.loaded = False  # the first load finished

    # --- queries ---

    def entries(self) -> list[ModelEntry]:
        return [self._entries[n] for n in sorted(self._entries)]

    def entry(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownModel(f"unknown model {name!r}; models: {known}") from None

    @property
    def default_name(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        if DEFAULT_MODEL in self._entries:  # the shipped default, where the repository holds it
            return DEFAULT_MODEL
        ready = [e.name for e in self.entries() if e.state == "ready"]
        return ready[0] if ready else (min(self._entries) if self._entries else None)

    @property
    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why the service cannot answer requests yet (None: it can)."""
        if not self.loaded:
            return "models are loading"
        default = self.settings.default_model
        if default and default not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            return f"the default model {default!r} is not in the model repository {self.settings.model_repo} (models: {known})"
        if default and self._entries[default].state != "ready":
            entry = self._entries[default]
            return f"the default model {default!r} is {entry.state}" + (f": {entry.error}" if entry.error else "")
        if not any(e.state == "ready" for e in self._entries.values()):
            return "no model is ready"
        return None

    def served(self, name: str | None) -> Served:
        """The version of model `name` (None: the default) that serves now."""
        if name is None:
            name = self.default_name
            if name is None:
                raise UnknownModel("no models are loaded")
        entry = self.entry(name)
        if entry.served is None:
            raise ModelNotReady(f"model {name!r} is {entry.state}" + (f": {entry.error}" if entry.error else ""))
        return entry.served

    @asynccontextmanager
    async def lease(self, name: str | None) -> AsyncIterator[Served]:
        """The served model `name` (None: the default), held until the block ends."""
        yield self.served(name)

    async def refresh(self) -> None:  # noqa: B027 - up to date already, except where a front must ask
        """Bring the entries up to date (a split server's front asks the inference process; here they are)."""

    async def exposition(self) -> bytes:
        """The Prometheus text of this server (a split server's front sums every process's)."""
        return generate_latest(self.metrics.registry)  # type: ignore[no-any-return]

    @abstractmethod
    async def load_all(self) -> None:
        """Load every model (a front: connect to the inference process, for the life of the front)."""

    @abstractmethod
    async def reload(self, name: str | None = None) -> list[dict[str, Any]]:
        """Reload one model, or rescan the repository; one outcome a model."""

    @abstractmethod
    async def close(self) -> None:
        """Shutdown."""


class ModelRepository(Repository):
    """The model repository of this process: each model loaded, warmed and batched here."""

    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader | None = None) -> None:
        super().__init__(settings, metrics)
        self._loader: Loader = loader or functools.partial(load_runtime, runtime=settings.runtime, compile_mode=settings.compile_mode)
        self._live: dict[str, ServedModel] = {}  # the version each model serves now (its entry's `served`)
        self._lock = asyncio.Lock()
        self._stopping: set[asyncio.Task[None]] = set()
        self._pixel_pools: dict[int, PixelPool] = {}  # one per pixel limit: every model's batcher shares it

    def live(self, name: str) -> ServedModel | None:
        """The version of model `name` serving now, with its runtime and batcher (None: not serving)."""
        return self._live.get(name)

    @asynccontextmanager
    async def lease(self, name: str | None) -> AsyncIterator[ServedModel]:
        """As `Repository.lease`; the version is counted as held, so that a reload retires it only once the
        last request holding it is done."""
        served = self._live[self.served(name).name]
        served.active += 1
        try:
            yield served
        finally:
            served.active -= 1
            self._maybe_stop(served)

    # --- loading ---

    async def load_all(self) -> None:
        async with self._lock:
            found = discover(self.settings.model_repo)
            if not found:
                log.error("no model directories in the model repository", extra={"model_repo": str(self.settings.model_repo)})
            for name, path in found.items():
                self._entries[name] = ModelEntry(name, path)
                self.metrics.model_state.labels(name).state("loading")
            for name, path in found.items():
                await self._load_one(name, path)
            self.loaded = True
            if self.settings.default_model and self.settings.default_model not in self._entries:
                log.error(
                    "the configured default model is not in the repository: the service stays not ready",
                    extra={"model": self.settings.default_model, "models": sorted(self._entries)},
                )

    async def reload(self, name: str | None = None) -> list[dict[str, Any]]:
        """Reload one model (or rescan the whole repository: new directories load, removed ones retire)."""
        async with self._lock:
            found = discover(self.settings.model_repo)
            if name is not None:
                if name not in found:
                    raise UnknownModel(f"no directory {name!r} in the model repository {self.settings.model_repo}")
                found = {name: found[name]}
            else:
                for gone in set(self._entries) - set(found):
                    self._entries.pop(gone)
                    old = self._live.pop(gone, None)
                    if old is not None:
                        self._retire(old)
                        self.metrics.model_runtime.remove(gone, *_runtime_labels(old.runtime))
                    self.metrics.model_state.remove(gone)
                    log.info("model removed from the repository", extra={"model": gone})
            outcomes = []
            for n, path in found.items():
                entry = self._entries.setdefault(n, ModelEntry(n, path))
                entry.path = path
                ok = await self._load_one(n, path)
                outcomes.append({"model": n, "reloaded": ok, "state": entry.state, "error": None if ok else entry.error})
            return outcomes

    async def _load_one(self, name: str, path: Path) -> bool:
        entry = self._entries[name]
        t0 = time.monotonic()
        try:
            runtime, executor = await asyncio.get_running_loop().run_in_executor(None, self._load_and_warm, name, path)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            entry.error = reason
            self.metrics.reloads.labels(name, "failed").inc()
            if entry.served is None:
                entry.state = "failed"
                self.metrics.model_state.labels(name).state("failed")
                log.error("model refused: it cannot be loaded", extra={"model": name, "path": str(path), "reason": reason})
            else:
                log.error("reload refused; the previous version keeps serving", extra={"model": name, "path": str(path), "reason": reason})
            return False
        served = self._serve(name, path, runtime, executor)
        old = self._live.get(name)
        self._live[name] = entry.served = served
        entry.state, entry.error = "ready", None
        self.metrics.model_state.labels(name).state("ready")
        self.metrics.reloads.labels(name, "ok").inc()
        if old is not None:
            with contextlib.suppress(KeyError):
                self.metrics.model_runtime.remove(name, *_runtime_labels(old.runtime))
            self._retire(old)
        self.metrics.model_runtime.labels(name, *_runtime_labels(runtime)).set(1)
        info = runtime.info
        log.info(
            "model ready",
            extra={
                "model": name,
                "codebook_size": info.codebook_size,
                "downsample": info.downsample,
                "precision": info.precision,
                "runtime": runtime.runtime_name,
                "providers": list(runtime.providers),
                "manifest_sha256": info.manifest_sha256,
                "load_s": round(time.monotonic() - t0, 3),
            },
        )
        return True

    def _load_and_warm(self, name: str, path: Path) -> tuple[Runtime, ThreadPoolExecutor]:
        """The runtime and its inference threads, each thread already warmed.

        Warm-up runs once on every inference thread rather than on the loading thread, so that what
        ONNX Runtime creates lazily per thread (the CUDA EP keeps its cuDNN/cuBLAS handles per
        thread) exists before the first request does.
        """
        s = self.settings
        gib = s.gpu_mem_limit_gib
        configure_cuda_memory(int(gib * 2**30) if gib else None, s.cuda_shared_arena)
        runtime = self._loader(
            path,
            name=name,
            device=s.device,
            precision=s.precision,
            intra_op_threads=s.intra_op_threads,
            max_batch_size=s.max_batch_size,
        )
        f = runtime.info.downsample
        sizes = [(max(f, size // f * f),) * 2 for size in s.warmup_sizes]
        workers = batch_workers(s, runtime)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"infer-{name}")
        if not sizes:
            return runtime, executor
        barrier = threading.Barrier(workers)

        def warm() -> None:
            # every task waits until all `workers` threads exist, so each thread takes exactly one
            barrier.wait(timeout=600)
            # no batch sizes given: every shape the runtime runs (all its padding buckets on CUDA)
            runtime.warmup(sizes, s.warmup_batch_sizes or None)  # type: ignore[arg-type]

        try:
            for future in [executor.submit(warm) for _ in range(workers)]:
                future.result()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return runtime, executor

    def _serve(self, name: str, path: Path, runtime: Runtime, executor: ThreadPoolExecutor) -> ServedModel:
        s = self.settings

        def run(op: str, batch: np.ndarray) -> np.ndarray:
            return runtime.encode(batch) if op == "encode" else runtime.decode(batch)

        pixels = self.max_batch_pixels(str(getattr(runtime, "device", "cpu")))
        pool = None if pixels is None else self._pixel_pools.setdefault(pixels, PixelPool(pixels))
        batcher = Batcher(
            name,
            run,
            executor,
            self.metrics,
            max_batch_size=s.max_batch_size,
            max_delay_s=s.max_batch_delay_ms / 1000,
            max_queue_images=s.max_queue_images,
            workers=batch_workers(s, runtime),
            max_batch_pixels=pixels,
            downsample=runtime.info.downsample,
            pixel_pool=pool,
        )
        batcher.start()
        return ServedModel(name, path, runtime, batcher, executor)

    def max_batch_pixels(self, device: str) -> int | None:
        """The pixel limit of a model on `device`: the setting, else derived from the memory budget on
        the CPU; none on a GPU, whose batches are bounded by device memory (gpu_mem_limit_gib)."""
        s = self.settings
        if s.max_batch_pixels is not None:
            return s.max_batch_pixels
        return pixel_budget(s.memory_budget_gib) if device == "cpu" else None

    # --- retiring ---

    def _retire(self, served: ServedModel) -> None:
        served.retired = True
        self._maybe_stop(served)

    def _maybe_stop(self, served: ServedModel) -> None:
        if served.retired and served.active == 0 and not served.stopping:
            served.stopping = True
            task = asyncio.get_running_loop().create_task(self._stop(served, release=True))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def _stop(self, served: ServedModel, drain_timeout_s: float | None = None, release: bool = False) -> None:
        """Drain the version's batcher and stop its threads; `release` (a version retired while the
        server goes on): also close its runtime and hand the memory back (see `_release`)."""
        await served.batcher.stop(self.settings.shutdown_timeout_s if drain_timeout_s is None else drain_timeout_s)
        if release:
            await asyncio.get_running_loop().run_in_executor(None, _release, served)
        else:
            served.executor.shutdown(wait=False)
        log.info("model version retired", extra={"model": served.name, "loaded_at": served.loaded_at})

    async def close(self) -> None:
        """Shutdown: drain every batcher (bounded by shutdown_timeout_s), then stop."""
        live = [s for s in self._live.values() if not s.stopping]
        for served in live:
            served.retired = served.stopping = True
        await asyncio.gather(*(self._stop(s) for s in live), *self._stopping)
