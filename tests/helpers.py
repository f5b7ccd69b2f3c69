"""Helpers shared by the test packages: tiny exported models, free localhost ports, a server in a thread."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VQTOK_DATA", REPO.parent / "shared" / "data"))  # the real image sets, read in place
# A tiny preset (argv[1]) with seed-0 weights, exported to argv[2] with its parity checked on the Kodak photos (argv[3]).
_EXPORT = """
import sys, torch
from models.presets import create_tokenizer
from models.export.driver import export_model
torch.manual_seed(0)
create_tokenizer(sys.argv[1], base_channels=8, norm_groups=4, num_res_blocks=1).save_pretrained(sys.argv[2])
export_model(sys.argv[2], parity_images=sys.argv[3])
"""


def _models_source_hash() -> str:
    """The exported test models' cache key: models/ (networks, export, and the artefact format in
    models/core), the export script above and the versions of the packages that write the graphs."""
    h = hashlib.sha256(_EXPORT.encode())
    for package in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            h.update(f"{package}=={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{package} absent".encode())
    for p in sorted((REPO / "models").rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _export_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where exported test models are kept: pytest's cache folder (across runs), else (-p no:cacheprovider)
    this session's temporary root, which the xdist workers of one session share (each has its own
    basetemp, popen-gwN, below it)."""
    pytest_cache = getattr(request.config, "cache", None)
    if pytest_cache is not None:
        return Path(pytest_cache.mkdir("vqtok-test-models"))
    base = tmp_path_factory.getbasetemp()
    store = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "vqtok-test-models"
    store.mkdir(exist_ok=True)
    return store


def exported_model_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, models: dict[str, str]) -> Path:
    """A model repository of tiny untrained presets ({name: preset}) exported to ONNX (parity checked on
    Kodak), each in its own subprocess (torch stays out of the test process), in parallel. Each preset is
    exported once (seed 0: the same weights under every name) and reused across runs while models/ and the
    exporting packages are unchanged (pytest's cache folder, `_models_source_hash`). A lock file makes
    parallel sessions and xdist workers wait for one export instead of each doing it again."""
    cache = _export_store(request, tmp_path_factory) / _models_source_hash()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f"{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, also if this process dies
        _export_missing(cache, set(models.values()))
    repo = tmp_path_factory.mktemp("repo")
    for name, preset in models.items():
        shutil.copytree(cache / preset, repo / name)
    return repo


def _export_missing(cache: Path, presets: set[str]) -> None:
    """Export each preset not yet in `cache` (cache/PRESET), in parallel subprocesses; each export goes to
    a folder of its own and is renamed into the cache when complete, so no reader sees half a model."""
    missing = sorted(p for p in presets if not (cache / p / "manifest.json").exists())
    staging = {preset: cache / f".{preset}.tmp-{os.getpid()}" for preset in missing}
    for tmp in staging.values():
        shutil.rmtree(tmp, ignore_errors=True)
    procs = [
        (
            preset,
            subprocess.Popen(
                [sys.executable, "-c", _EXPORT, preset, str(staging[preset]), str(DATA / "kodak")],
                cwd=REPO,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for preset in missing
    ]
    for preset, p in procs:
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:
            shutil.rmtree(staging[preset], ignore_errors=True)
            pytest.fail(f"exporting the test model {preset} failed:\n{err[-3000:]}")
        shutil.rmtree(cache / preset, ignore_errors=True)  # a folder without a manifest: an interrupted older run
        os.replace(staging[preset], cache / preset)


# Ports for test servers come from below the kernel's ephemeral range, which bind(("", 0)) and every
# client connection draw from: a port picked there could be taken by another connection (another xdist
# worker's clients, say) between the pick and the server's bind. Each xdist worker has a block of its own.
_PORT_BLOCK = 1500
_ports: list[int] = []


def _port_range() -> range | None:
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    start = 10_000 + index * _PORT_BLOCK
    if start + _PORT_BLOCK > ephemeral_low:
        return None
    return range(start, start + _PORT_BLOCK)


def free_port() -> int:
    """A localhost port nothing listens on (and that nobody else's bind(0) or connection will take): the
    next free one of this worker's block below the ephemeral range, starting at a random place in it (so
    two sessions at once rarely meet); an ephemeral one where there is no room below that range."""
    block = _port_range()
    if block is not None:
        if not _ports:
            first = random.randrange(len(block))
            _ports.extend([*block[first:], *block[:first]])
        for _ in range(len(block)):
            port = _ports.pop(0)
            _ports.append(port)  # round robin: a port handed out is not offered again soon
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(url: str, ready: bool, timeout: float) -> bool:
    """Whether /readyz (or, with ready=False, /healthz) answered 200 within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz" if ready else f"{url}/healthz", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False


class ServerThread:
    """The real service app under uvicorn in a thread, on a free localhost port. `loader` replaces
    `ModelRuntime.load` (tests wrap the real runtime to inject faults)."""

    def __init__(self, settings: Any, loader: Callable[..., Any] | None = None) -> None:
        import uvicorn

        from service.app import create_app

        self.port = free_port()
        self.settings = settings.model_copy(update={"port": self.port})
        self.app = create_app(self.settings, loader=loader)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None, access_log=False, timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, ready: bool = True, timeout: float = 60) -> Self:
        """Start; return once /readyz (or, with ready=False, /healthz) answers 200."""
        self.thread.start()
        if _wait_until_up(self.url, ready, timeout):
            return self
        raise RuntimeError(f"server on {self.url} did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class SplitServerThread:
    """A split server (`front_workers` front processes and one inference process, service/multiproc/server.py) on a
    free localhost port, supervised from a thread of the test process; the same face as ServerThread."""

    def __init__(self, settings: Any) -> None:
        from service.multiproc.server import SplitServer

        self.port = free_port()
        self.settings = settings.model_copy(update={"port": self.port, "front_workers": settings.front_workers or 2})
        self.server = SplitServer(self.settings)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, ready: bool = True, timeout: float = 90) -> Self:
        """Start; return once /readyz (or, with ready=False, /healthz) answers 200."""
        self.server.start().watch_in_thread()
        if _wait_until_up(self.url, ready, timeout):
            return self
        self.stop()
        raise RuntimeError(f"split server on {self.url} did not become ready")

    def stop(self) -> None:
        self.server.stop()
