"""Fixtures for the client and tokenization tests: a tiny exported model (cached across runs while
models/ and the runtime are unchanged), a real uvicorn server on a free localhost port, a local Ray."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerThread, exported_model_repo

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
    from models.runtime.onnx import ModelRuntime

    return ModelRuntime.load(model_dir, device="cpu")


Server = ServerThread  # the name the client tests annotate with


def new_server(model_repo: Path, **overrides: Any) -> ServerThread:
    """A (not yet started) server on `model_repo` with the tests' base settings plus `overrides`."""
    from service.settings import Settings

    base: dict[str, Any] = {"model_repo": model_repo, "device": "cpu", "warmup_sizes": [32], "log_format": "text"}
    return ServerThread(Settings(**(base | overrides)))


@pytest.fixture(scope="session")
def server(model_repo: Path) -> Iterator[Server]:
    s = new_server(model_repo).start()
    yield s
    s.stop()


@pytest.fixture
def serve(model_repo: Path) -> Iterator[Callable[..., Server]]:
    """serve(**settings) -> a started server with those settings; stopped after the test."""
    started: list[Server] = []

    def start(**overrides: Any) -> Server:
        started.append(new_server(model_repo, **overrides).start())
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="package")
def ray_local() -> Iterator[Any]:
    """A local Ray with 2 CPUs for the client tests (starting one costs seconds), shut down after them: idle,
    its nine processes still take ≈ 4 % of a core. Under xdist all its tests are one unit of work (tests/conftest.py)."""
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
