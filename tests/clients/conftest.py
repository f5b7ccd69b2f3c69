"""Fixtures for the client and tokenization tests: a tiny exported model (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained cifar-fsq tokenizer (f=4, K=1000) exported to ONNX: fast on CPU, a real graph."""
    import torch

    from models import create_tokenizer
    from models.export import export_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models") / "tiny"
    create_tokenizer("cifar-fsq", base_channels=8, norm_groups=4, num_res_blocks=1).save_pretrained(d)
    export_model(d)
    return d


@pytest.fixture(scope="session")
def tiny_runtime(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from service.runtime import ModelRuntime

    return ModelRuntime.load(tiny_model_dir, device="cpu")
