"""Shared fixtures: paths to the real image sets in ../shared/data (read in place, never copied)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VQTOK_DATA", REPO.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"real test data not found at {path}; set VQTOK_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA)


@pytest.fixture(scope="session")
def kodak_dir() -> Path:
    return _need(DATA / "kodak")


@pytest.fixture(scope="session")
def photos_val_dir() -> Path:
    return _need(DATA / "photos256" / "val")


@pytest.fixture(scope="session")
def photos_train_dir() -> Path:
    return _need(DATA / "photos256" / "train")


@pytest.fixture(scope="session")
def cifar_test_parquet() -> Path:
    return _need(DATA / "cifar10" / "test-00000-of-00001.parquet")
