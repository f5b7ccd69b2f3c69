"""Fixtures for the client and tokenization tests: a tiny exported model (cached across runs while
models/ and the runtime are unchanged), a real uvicorn server on a free localhost port, a local Ray."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny"
_EXPORT = """
import sys, torch
from models import create_tokenizer
from models.export import export_model
torch.manual_seed(0)
create_tokenizer("cifar-fsq", base_channels=8, norm_groups=4, num_res_blocks=1).save_pretrained(sys.argv[1])
export_model(sys.argv[1])
"""


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in [*sorted((REPO / "models").rglob("*.py")), REPO / "service" / "runtime.py"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def model_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding one untrained cifar-fsq tokenizer (f=4, K=1000) exported to ONNX:
    a real graph, fast on CPU. Exported in a subprocess (torch stays out of this process)."""
    cache = Path(request.config.cache.mkdir("vqtok-client-models")) / _source_hash() / MODEL_NAME
    if not (cache / "manifest.json").exists():
        shutil.rmtree(cache, ignore_errors=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-c", _EXPORT, str(cache)], cwd=REPO, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            shutil.rmtree(cache, ignore_errors=True)
            pytest.fail(f"exporting the test model failed:\n{done.stderr[-3000:]}")
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(cache, repo / MODEL_NAME)
    return repo


@pytest.fixture(scope="session")
def model_dir(model_repo: Path) -> Path:
    return model_repo / MODEL_NAME


@pytest.fixture(scope="session")
def runtime(model_dir: Path) -> Any:
    from service.runtime import ModelRuntime

    return ModelRuntime.load(model_dir, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """The real service app under uvicorn, in a thread, on a free localhost port."""

    def __init__(self, model_repo: Path, **overrides: Any) -> None:
        import uvicorn

        from service.app import create_app
        from service.settings import Settings

        self.port = _free_port()
        base: dict[str, Any] = {"model_repo": model_repo, "device": "cpu", "warmup_sizes": [32], "log_format": "text", "port": self.port}
        self.app = create_app(Settings(**(base | overrides)))
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> Server:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server on {self.url} did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def server(model_repo: Path) -> Iterator[Server]:
    s = Server(model_repo).start()
    yield s
    s.stop()


@pytest.fixture
def serve(model_repo: Path) -> Iterator[Callable[..., Server]]:
    """serve(**settings) -> a started server with those settings; stopped after the test."""
    started: list[Server] = []

    def start(**overrides: Any) -> Server:
        started.append(Server(model_repo, **overrides).start())
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """A local Ray with 2 CPUs for the whole session (starting one costs seconds)."""
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
