"""Training data: the sources of `models.core.sources` (folders, parquet, webdataset tars), decoded by
the one pixel rule of `models.core.pixels`, augmented, sampled resumably.

Every sample is decoded to uint8 RGB and stays uint8 until it reaches the device (4× less to copy
than float). Augmentation is seeded per sample from (seed, position in the sample stream), so a
batch is the same whatever the number of workers and however often the run was resumed.
An unreadable image is logged, counted and skipped; it never ends a run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from models.core import pixels
from models.core.errors import SourceError
from models.core.pixels import IMAGE_EXTENSIONS
from models.core.sources import FolderSource, ParquetSource, TarSource
from models.core.sources import open_source as _open_source

log = logging.getLogger(__name__)

DataError = SourceError  # a data path that holds no usable images (missing, empty, or of an unknown kind)
ImageSource = FolderSource | ParquetSource | TarSource


def open_source(path: str | Path, image_column: str | None = None) -> ImageSource:
    """A folder of images, a parquet file or folder of them, or a .tar shard or folder of them
    (`models.core.sources`, the reader dataset tokenization uses too); DataError if it holds none."""
    source = _open_source(path, image_column)
    if len(source) == 0:
        raise DataError(f"no images found in {path} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, .parquet, .tar)")
    return source


def decode_image(blob: bytes) -> np.ndarray:
    """Encoded bytes -> uint8 (H, W, 3) RGB by the one pixel rule (EXIF, alpha on white, grey).
    Raises on anything undecodable."""
    return pixels.decode_pixels(blob)


# --- augmentation ---


def resize_short_side(img: np.ndarray, size: int) -> np.ndarray:
    if min(img.shape[:2]) == size:
        return img
    return np.array(pixels.resize_short_side(Image.fromarray(img), size))


@dataclass(frozen=True)
class Augment:
    """Crop (and flip) to a square `resolution`.

    random_crop: a random window at native scale (images smaller than it are first upscaled);
    resize_crop: random scale in [resolution, 1.5·resolution] for the short side, then a random window;
    center_crop: short side resized to `resolution`, central window (validation).
    """

    resolution: int
    mode: str = "random_crop"
    flip: bool = True

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        r = self.resolution
        if self.mode == "center_crop":
            img = resize_short_side(img, r)
            h, w = img.shape[:2]
            top, left = (h - r) // 2, (w - r) // 2
        else:
            if self.mode == "resize_crop":
                img = resize_short_side(img, int(rng.integers(r, int(r * 1.5) + 1)))
            elif min(img.shape[:2]) < r:
                img = resize_short_side(img, r)
            h, w = img.shape[:2]
            top, left = int(rng.integers(0, h - r + 1)), int(rng.integers(0, w - r + 1))
        img = img[top : top + r, left : left + r]
        if self.flip and self.mode != "center_crop" and rng.random() < 0.5:
            img = img[:, ::-1]
        return np.ascontiguousarray(img)


# --- datasets and sampling ---


class ImageDataset(Dataset):
    """Items are (index, stream position) pairs from StreamSampler (or plain indices);
    returns a uint8 (3, r, r) tensor, or None for an unreadable image (the collate drops it)."""

    def __init__(self, source: ImageSource, augment: Augment, seed: int = 0, cache_in_memory: bool = False, threads: int = 8) -> None:
        self.source = source
        self.augment = augment
        self.seed = seed
        self.cache: list[np.ndarray | None] | None = None
        if cache_in_memory:
            self.cache = self._decode_all(threads)

    def _decode_one(self, index: int) -> np.ndarray | None:
        try:
            return decode_image(self.source.item(index).read())
        except Exception as exc:  # PIL raises many types; any of them means "skip this file"
            log.warning("skipping unreadable image %s: %s", self.source.item(index).key, exc)
            return None

    def _decode_all(self, threads: int) -> list[np.ndarray | None]:
        with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes without the GIL
            images = list(pool.map(self._decode_one, range(len(self.source))))
        skipped = sum(img is None for img in images)
        log.info("cached %d images in memory (%d unreadable, skipped)", len(images) - skipped, skipped)
        return images

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int | tuple[int, int]) -> Tensor | None:
        index, position = item if isinstance(item, tuple) else (item, item)
        img = self.cache[index] if self.cache is not None else self._decode_one(index)
        if img is None:
            return None
        rng = np.random.default_rng([self.seed, position])
        out = self.augment(img, rng)
        return torch.from_numpy(out).permute(2, 0, 1)


def collate_skip(batch: list[Tensor | None]) -> tuple[Tensor, int]:
    """Stack the readable images; report how many were skipped."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), skipped
    return torch.stack(good), skipped


class StreamSampler(Sampler):
    """An endless stream of (index, position) pairs, resumable at any position.

    The global stream is the concatenation of per-epoch permutations seeded by (seed, epoch);
    rank r of `world` takes positions r, r + world, … . Every batch of `batch_size` per rank takes
    batch_size·world positions, so the number of positions taken so far (the trainer's
    `data_position`, counted per batch drawn, trained on or not) is the whole data-loader state.
    """

    def __init__(self, num_items: int, seed: int = 0, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.n, self.seed, self.rank, self.world, self.start = num_items, seed, rank, world, start

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start + self.rank
        epoch, perm = -1, []
        while True:
            e = position // self.n
            if e != epoch:
                epoch, perm = e, self._perm(e)
            yield perm[position % self.n], position
            position += self.world

    def __len__(self) -> int:  # endless; DataLoader only needs a number for its bookkeeping
        return 2**62


def iter_images(path: str | Path, limit: int = 0, image_column: str | None = None) -> Iterator[tuple[str, np.ndarray | None]]:
    """Whole images for evaluation, in source order: (name, uint8 HWC) or (name, None) if unreadable."""
    source = open_source(path, image_column)
    n = len(source) if limit <= 0 else min(limit, len(source))
    for item in source.slice(0, n):
        try:
            yield item.key, decode_image(item.read())
        except Exception as exc:
            log.warning("skipping unreadable image %s: %s", item.key, exc)
            yield item.key, None


def to_float(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float (B, 3, H, W) in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 in [0, 255], rounded (what a saved image would hold)."""
    return images.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
