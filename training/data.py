"""Training data: the sources of `models.core.sources` (folders, parquet, webdataset tars), decoded by
the one pixel rule of `models.core.pixels`, augmented, sampled resumably.

Every sample is decoded to uint8 RGB and stays uint8 until it reaches the device (4× less to copy
than float). Augmentation is seeded per sample from (seed, position in the sample stream), so a
batch is the same whatever the number of workers and however often the run was resumed.
An unreadable image is logged, counted and skipped; it never ends a run.

Several training sources (`data.train` as a list, globs allowed) are read as one `MultiSource`; with
weights, `MixtureSampler` draws each stream position's source at random by weight and, within a
source, walks its own per-epoch permutations, so exact resume holds as for one source.
"""

from __future__ import annotations

import bisect
import glob
import logging
from collections.abc import Iterator, Sequence
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
from models.core.sources import FolderSource, ParquetSource, RawItem, TarSource
from models.core.sources import open_source as _open_source
from models.tokenizer import uint8_from_unit, unit_from_uint8

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


class MultiSource:
    """Several sources as one indexable list: global index i is item i − offset[s] of source s,
    the sources in the order given."""

    def __init__(self, sources: Sequence[ImageSource], names: Sequence[str]) -> None:
        if len(sources) != len(names) or not sources:
            raise ValueError("MultiSource needs one name per source, and at least one source")
        self.sources = list(sources)
        self.names = [str(n) for n in names]
        self.sizes = [len(s) for s in self.sources]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> (source number, index in that source)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        s = bisect.bisect_right(self.offsets, index) - 1
        return s, index - self.offsets[s]

    def item(self, index: int) -> RawItem:
        s, i = self.locate(index)
        return self.sources[s].item(i)


_GLOB_CHARS = frozenset("*?[")
_SOURCE_SUFFIXES = (".parquet", ".tar")


def expand_train_entry(entry: str) -> list[str]:
    """A `data.train` entry -> the source paths it names: itself, or for a glob pattern every folder,
    .parquet and .tar file it matches (sorted). DataError when a pattern matches none."""
    if not _GLOB_CHARS & set(entry):
        return [entry]
    found = sorted(p for p in glob.glob(entry) if Path(p).is_dir() or Path(p).suffix in _SOURCE_SUFFIXES)
    if not found:
        raise DataError(f"training data pattern {entry} matches no folder, .parquet or .tar")
    return found


def open_train_sources(
    entries: str | Sequence[str], weights: Sequence[float] = (), image_column: str | None = None
) -> tuple[MultiSource, list[float] | None]:
    """The training sources `data.train` names, and each source's sampling weight (normalised to
    sum 1; an entry's weight split among the sources of its glob by their sizes), or None without
    weights: uniform over all images."""
    entries = [entries] if isinstance(entries, str) else list(entries)
    if weights and len(weights) != len(entries):
        raise ValueError(f"{len(weights)} weights for {len(entries)} training entries")
    sources: list[ImageSource] = []
    names: list[str] = []
    per_source: list[float] = []
    for k, entry in enumerate(entries):
        group = [(path, open_source(path, image_column)) for path in expand_train_entry(entry)]
        total = sum(len(src) for _, src in group)
        for path, src in group:
            sources.append(src)
            names.append(path)
            per_source.append(float(weights[k]) * len(src) / total if weights else 0.0)
    multi = MultiSource(sources, names)
    if len(sources) > 1:
        shares = ", ".join(f"{n} ({size})" for n, size in zip(names, multi.sizes, strict=True))
        log.info("training sources: %s", shares)
    if not weights:
        return multi, None
    norm = sum(per_source)
    return multi, [w / norm for w in per_source]


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

    def __init__(
        self, source: ImageSource | MultiSource, augment: Augment, seed: int = 0, cache_in_memory: bool = False, threads: int = 8
    ) -> None:
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


class MixtureSampler(Sampler):
    """An endless, resumable stream of (index, position) pairs over several sources with weights.

    Position p of the global stream draws its source at random with probability weights[s] (the
    draws of each block of CHUNK positions come from a generator seeded by (seed, block)); the k-th
    position given to source s takes item perm_{s,e}[k mod n_s] of it, e = k div n_s, with perm_{s,e}
    a permutation seeded by (seed, s, e): within a source, each epoch is one pass over its images.
    Ranks share the stream as in StreamSampler (rank r takes positions r, r + world, …). Resuming
    at position P recounts the draws of the P positions before it: O(P / CHUNK) vectorised blocks.
    """

    CHUNK = 8192

    def __init__(
        self, sizes: Sequence[int], weights: Sequence[float], seed: int = 0, rank: int = 0, world: int = 1, start: int = 0
    ) -> None:
        if len(sizes) != len(weights) or not sizes or any(n < 1 for n in sizes) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"MixtureSampler needs one weight >= 0 per non-empty source, got sizes {list(sizes)}, weights {list(weights)}")
        self.sizes = [int(n) for n in sizes]
        p = np.asarray(weights, dtype=np.float64)
        self.cumulative = np.cumsum(p / p.sum())
        self.cumulative[-1] = 1.0
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.seed, self.rank, self.world, self.start = seed, rank, world, start

    def _draws(self, block: int) -> np.ndarray:
        """The sources of positions [block·CHUNK, (block + 1)·CHUNK)."""
        u = np.random.default_rng([self.seed, 0x5EED, block]).random(self.CHUNK)
        return np.minimum(np.searchsorted(self.cumulative, u, side="right"), len(self.sizes) - 1)

    def _counts_before(self, position: int) -> np.ndarray:
        counts = np.zeros(len(self.sizes), dtype=np.int64)
        full, rest = divmod(position, self.CHUNK)
        for block in range(full):
            counts += np.bincount(self._draws(block), minlength=len(self.sizes))
        if rest:
            counts += np.bincount(self._draws(full)[:rest], minlength=len(self.sizes))
        return counts

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, source, epoch]).permutation(self.sizes[source])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        counts = self._counts_before(position)
        block, draws = -1, np.empty(0, dtype=np.int64)
        perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation)
        while True:
            for q in range(position, position + self.world):  # one position per rank
                b, i = divmod(q, self.CHUNK)
                if b != block:
                    block, draws = b, self._draws(b)
                s = int(draws[i])
                if q == position + self.rank:
                    epoch, k = divmod(int(counts[s]), self.sizes[s])
                    if perms.get(s, (-1,))[0] != epoch:
                        perms[s] = (epoch, self._perm(s, epoch))
                    yield self.offsets[s] + int(perms[s][1][k]), q
                counts[s] += 1
            position += self.world

    def __len__(self) -> int:
        return 2**62


def worker_init(worker_id: int) -> None:
    """DataLoader workers decode and crop on one thread each: a worker per core, no pools fighting
    (torch's worker loop sets this too; numpy/PIL do not start pools of their own here)."""
    del worker_id
    torch.set_num_threads(1)


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


# the value rule (uint8 <-> [-1, 1]) is the tokenizer's own, written once in models/tokenizer.py
to_float = unit_from_uint8
to_uint8 = uint8_from_unit
