"""Fixtures for the training tests: tiny models and a handful of real photos (linked, never copied)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = {"base_channels": 8, "norm_groups": 4, "num_res_blocks": 1}


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Tiny models run faster on one thread than contending for two."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def few_photos(photos_train_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of symlinks to 8 real 256×256 training photos."""
    folder = tmp_path_factory.mktemp("few_photos")
    for src in sorted(photos_train_dir.glob("*.jpg"))[:8]:
        (folder / src.name).symlink_to(src)
    return folder


def tiny_overrides(run_data: Path, val: Path | None = None, **extra: object) -> list[str]:
    """Dotted overrides for a seconds-long CPU run of a tiny FSQ tokenizer at 32 px."""
    items = {
        "model.preset": "cifar-fsq",
        "model.overrides": "{base_channels: 8, norm_groups: 4, num_res_blocks: 1}",
        "data.train": str(run_data),
        "data.resolution": 32,
        "data.num_workers": 0,
        "batch_size": 4,
        "max_steps": 6,
        "optim.warmup_steps": 2,
        "optim.lr": 1e-3,
        "ema_decay": 0.9,
        "log_every": 2,
        "eval_every": 3,
        "image_every": 3,
        "checkpoint_every": 3,
        "progress": False,
        "device": "cpu",
    }
    if val is not None:
        items["data.val"] = str(val)
        items["data.val_limit"] = 4
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]
