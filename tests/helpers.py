"""Helpers shared by the test packages: tiny exported models, free localhost ports, a server in a thread."""

from __future__ import annotations

import hashlib
import os
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
_EXPORT = """
import sys, torch
from models.presets import create_tokenizer
from models.export.driver import export_model
torch.manual_seed(0)
create_tokenizer(sys.argv[1], base_channels=8, norm_groups=4, num_res_blocks=1).save_pretrained(sys.argv[2])
export_model(sys.argv[2])
"""


def _models_source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((REPO / "models").rglob("*.py")):  # the artefact format lives in models/core
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def exported_model_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, models: dict[str, str]) -> Path:
    """A model repository of tiny untrained presets ({name: preset}) exported to ONNX, each in its own
    subprocess (torch stays out of the test process), in parallel. Reused across runs while models/
    (networks, export, and the artefact format in models/core) is unchanged (pytest's cache folder, keyed by its source hash)."""
    pytest_cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    store = pytest_cache.mkdir("vqtok-test-models") if pytest_cache else tmp_path_factory.mktemp("exports")
    cache = Path(store) / _models_source_hash()
    missing = {name: preset for name, preset in models.items() if not (cache / name / "manifest.json").exists()}
    if missing:
        # each export goes to a folder of its own and is renamed into the cache when complete, so
        # test runs in parallel (several sessions, xdist) never see or remove a half-written model
        cache.mkdir(parents=True, exist_ok=True)
        staging = {name: cache / f".{name}.tmp-{os.getpid()}" for name in missing}
        for tmp in staging.values():
            shutil.rmtree(tmp, ignore_errors=True)
        procs = [
            (
                name,
                subprocess.Popen([sys.executable, "-c", _EXPORT, preset, str(staging[name])], cwd=REPO, stderr=subprocess.PIPE, text=True),
            )
            for name, preset in missing.items()
        ]
        for name, p in procs:
            _, err = p.communicate(timeout=300)
            if p.returncode != 0:
                shutil.rmtree(staging[name], ignore_errors=True)
                pytest.fail(f"exporting the test model {name} failed:\n{err[-3000:]}")
            if (cache / name / "manifest.json").exists():  # another run finished it first
                shutil.rmtree(staging[name], ignore_errors=True)
            else:
                shutil.rmtree(cache / name, ignore_errors=True)
                os.replace(staging[name], cache / name)
    repo = tmp_path_factory.mktemp("repo")
    for name in models:
        shutil.copytree(cache / name, repo / name)
    return repo


def free_port() -> int:
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
    """A split server (`front_workers` front processes and one inference process, service/split.py) on a
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
