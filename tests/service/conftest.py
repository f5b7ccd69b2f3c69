"""Fixtures for the service tests: a small model repository of real exported graphs, and real uvicorn
servers on free localhost ports (in a thread, so tests can wrap the runtime to inject faults).

`server` and `serve` run every test twice: against the single-process server (`front_workers=0`) and
against a split server (two front processes and an inference process, `front_workers=2`); a test
that injects faults through `loader` runs on the single-process server only (the split server's
runtime lives in another process)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from models.runtime.onnx import ModelRuntime
from service.settings import Settings
from tests.helpers import ServerThread, SplitServerThread, exported_model_repo

REPO = Path(__file__).resolve().parents[2]
# Two tiny untrained models (real graphs, fast on CPU): FSQ f=4 (K=1000) and SimVQ f=4 (K=1024).
MODELS = {"fsq4": "cifar-fsq", "simvq4": "cifar-simvq"}


@pytest.fixture(scope="session")
def model_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with fsq4 and simvq4 (real exported graphs)."""
    return exported_model_repo(request, tmp_path_factory, MODELS)


MODES = ["single", "split"]


def cpu_settings(model_repo: Path, **overrides: Any) -> Settings:
    """The tests' server settings: the CPU, one thread, 32² warm-up, text logs; `overrides` on top."""
    base: dict[str, Any] = {
        "model_repo": model_repo,
        "device": "cpu",
        "warmup_sizes": [32],
        "log_format": "text",
        "intra_op_threads": 1,
    }
    return Settings(**(base | overrides))


@pytest.fixture(params=MODES)
def serve(request: pytest.FixtureRequest, model_repo: Path) -> Iterator[Callable[..., ServerThread]]:
    """serve(loader=None, **settings) -> a started ServerThread (or SplitServerThread); all are stopped after the test."""
    started: list[Any] = []
    split = request.param == "split"

    def start(loader: Callable[..., Any] | None = None, ready: bool = True, **overrides: Any) -> Any:
        if split and loader is not None:
            pytest.skip("faults are injected into this process's runtime; a split server runs its models in another process")
        settings = cpu_settings(overrides.pop("model_repo", model_repo), **overrides)
        server = SplitServerThread(settings) if split else ServerThread(settings, loader)
        started.append(server)
        return server.start(ready=ready)

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module", params=MODES)
def server(request: pytest.FixtureRequest, model_repo: Path) -> Iterator[Any]:
    """One plain server shared by a test module (once single-process, once split)."""
    settings = Settings(
        model_repo=model_repo, device="cpu", warmup_sizes=[32], log_format="text", default_model="fsq4", max_batch_delay_ms=5
    )
    s = (SplitServerThread(settings) if request.param == "split" else ServerThread(settings)).start()
    yield s
    s.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


# --- real images ---


@pytest.fixture(scope="session")
def photos(photos_val_dir: Path) -> list[Path]:
    return sorted(photos_val_dir.glob("*.jpg"))[:40]


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def photo_crop(path: Path, size: int = 32) -> np.ndarray:
    """A real photo, centre-cropped and resized to size×size RGB."""
    with Image.open(path) as f:
        im = f.convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        return np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC))


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


class FaultyRuntime:
    """Wraps a real ModelRuntime. While `gate` is clear, inference waits at it (after setting
    `entered`); images whose first pixel is POISON or OOM raise instead of running."""

    POISON = (1, 2, 3)
    OOM = (4, 5, 6)

    def __init__(self, real: ModelRuntime, gate: threading.Event, entered: threading.Event, batches: list[int]) -> None:
        self._real, self._gate, self._entered, self.batches = real, gate, entered, batches
        self.info, self.providers = real.info, real.providers
        self.device, self.runtime_name = real.device, real.runtime_name

    def _wait(self, n: int) -> None:
        self.batches.append(n)
        self._entered.set()
        if not self._gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")

    def encode(self, images: np.ndarray) -> np.ndarray:
        self._wait(len(images))
        firsts = {tuple(int(v) for v in im[0, 0]) for im in images}
        if self.POISON in firsts:
            raise RuntimeError("injected inference failure")
        if self.OOM in firsts:
            raise RuntimeError("CUDA failure 2: out of memory (injected)")
        return self._real.encode(images)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        self._wait(len(tokens))
        return self._real.decode(tokens)

    @property
    def closed(self) -> bool:
        return self._real.closed

    def close(self) -> None:
        self._real.close()

    def warmup(self, sizes: Any, batch_sizes: Any = None) -> None:
        self._real.warmup(sizes, batch_sizes)


class Faults:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[int] = []
        self.loads = 0
        self.runtimes: list[FaultyRuntime] = []

    def loader(self, path: Path, **kwargs: Any) -> FaultyRuntime:
        self.loads += 1
        self.runtimes.append(FaultyRuntime(ModelRuntime.load(path, **kwargs), self.gate, self.entered, self.batches))
        return self.runtimes[-1]


@pytest.fixture
def faults() -> Iterator[Faults]:
    f = Faults()
    yield f
    f.gate.set()  # never leave a server thread blocked in the model
