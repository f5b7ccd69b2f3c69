"""What a run writes for people to read: metrics.jsonl (always), TensorBoard scalars and images
(when the tensorboard package is installed), and PNG images under run/images/."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.writer: Any = None
        if not enabled:
            return
        (run_dir / "images").mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # the GPU machine has no tensorboard: metrics.jsonl and PNGs still hold everything
            log.info("tensorboard not installed: logging to %s only", run_dir / METRICS_FILE)

    def scalars(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3)}
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()})
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """image: uint8 (H, W, 3)."""
        if not self.enabled:
            return
        Image.fromarray(image).save(self.run_dir / "images" / f"step_{step:08d}_{tag}.png")
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def reconstruction_grid(originals: Tensor, reconstructions: Tensor) -> np.ndarray:
    """uint8 (B, 3, H, W) pairs -> one uint8 image: originals on the top row, reconstructions below."""
    top = torch.cat(list(originals), dim=2)  # (3, H, B·W)
    bottom = torch.cat(list(reconstructions), dim=2)
    return torch.cat([top, bottom], dim=1).permute(1, 2, 0).contiguous().numpy()


def usage_histogram(counts: Tensor, height: int = 200, width: int = 512) -> np.ndarray:
    """Code counts sorted high to low, log scale, drawn as a white-on-black bar chart (uint8 HWC).
    A flat plateau across the width is healthy; a cliff after a few codes is a collapse."""
    c = counts.double().sort(descending=True).values
    k = c.numel()
    cols = torch.linspace(0, k - 1, width).long()
    v = torch.log1p(c[cols])
    v = v / v.max().clamp_min(1e-12)
    bars = (v * (height - 1)).round().long()
    img = np.zeros((height, width, 3), dtype=np.uint8)
    for x, h in enumerate(bars.tolist()):
        if h > 0:
            img[height - h :, x] = 255
    return img
