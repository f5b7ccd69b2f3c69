"""Models and data for a benchmark: a tiny exported model (the CPU benches whose model must cost next
to nothing), an untrained preset exported (throughput does not depend on the weights), a folder of
photos repeated through symlinks (every file read and decoded for real), and an encoder that answers
at once (the host side of a pipeline without the model)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .record import PHOTOS_VAL, REPO

_EXPORT_TINY = """
import sys, torch
from models.presets import create_tokenizer
from models.export.driver import export_model
torch.manual_seed(0)
create_tokenizer("f8-fsq-64k", base_channels=8, norm_groups=4, num_res_blocks=1, resolution=32).save_pretrained(sys.argv[1])
export_model(sys.argv[1])
"""

_EXPORT_PRESET = """
import sys, torch
from models.presets import create_tokenizer
from models.export.driver import export_model
torch.manual_seed(0)
create_tokenizer(sys.argv[1]).save_pretrained(sys.argv[2])
export_model(sys.argv[2])
"""


def tiny_model(repo: Path) -> str:
    """A tiny untrained f8 FSQ model at 32² exported into `repo` (once): its name there."""
    if not (repo / "tiny32" / "manifest.json").exists():
        subprocess.run([sys.executable, "-c", _EXPORT_TINY, str(repo / "tiny32")], cwd=REPO, check=True)
    return "tiny32"


def tiny_server_args(
    model_repo: Path, model: str, concurrency: int, images_per_request: int = 1, decode_threads: int = 2
) -> argparse.Namespace:
    """`bench.harness.server.spawn_server`'s settings for a tiny model on the CPU (the CPU front benches)."""
    return argparse.Namespace(
        model_repo=model_repo,
        model=model,
        device="cpu",
        runtime="auto",
        max_batch_size=16,
        max_batch_delay_ms=2.0,
        decode_threads=decode_threads,
        concurrency=[concurrency],
        images_per_request=[images_per_request],
        warmup_size=32,
        intra_op_threads=None,
    )


def export_preset(preset: str, into: Path) -> Path:
    """An untrained model of `preset`, exported in a subprocess (throughput does not depend on the
    weights, and torch's memory stays out of this process)."""
    d = into / preset
    subprocess.run([sys.executable, "-c", _EXPORT_PRESET, preset, str(d)], cwd=REPO, check=True)
    return d


def image_folder(into: Path, count: int, source: Path = PHOTOS_VAL) -> Path:
    """`count` JPEGs of `source` in a new folder under `into`, repeated through symlinks."""
    photos = sorted(source.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"no JPEGs in {source}; set VQTOK_DATA")
    folder = into / f"images-{count}"
    folder.mkdir()
    for i in range(count):
        (folder / f"img_{i:06d}.jpg").symlink_to(photos[i % len(photos)])
    return folder


class InstantEncoder:
    """The model taken out of the pipeline: answers every batch at once with one real image's ids."""

    def __init__(self, runtime: Any) -> None:
        from clients.tokenize.encoders import RuntimeEncoder

        real = RuntimeEncoder(runtime)
        self.spec, self.concurrency, self.decode_pool = real.spec, 1, real.decode_pool
        self._tokens = runtime.encode(np.zeros((1, 256, 256, 3), np.uint8))[0]

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self._tokens, (len(pixels), *self._tokens.shape)).copy()
