"""Fixtures for the client and tokenization tests: a tiny exported model (cached across runs while
models/ and the runtime are unchanged), a real uvicorn server on a free localhost port, a local Ray."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import exported_model_repo, free_port

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny"


@pytest.fixture(scope="session")
def model_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding one untrained cifar-fsq tokenizer (f=4, K=1000) exported to ONNX."""
    return exported_model_repo(request, tmp_path_factory, {MODEL_NAME: "cifar-fsq"})


@pytest.fixture(scope="session")
def model_dir(model_repo: Path) -> Path:
    return model_repo / MODEL_NAME


@pytest.fixture(scope="session")
def runtime(model_dir: Path) -> Any:
    from service.runtime import ModelRuntime

    return ModelRuntime.load(model_dir, device="cpu")


class Server:
    """The real service app under uvicorn, in a thread, on a free localhost port."""

    def __init__(self, model_repo: Path, **overrides: Any) -> None:
        import uvicorn

        from service.app import create_app
        from service.settings import Settings

        self.port = free_port()
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
