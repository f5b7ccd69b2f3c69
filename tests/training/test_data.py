from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from training.config import build_config
from training.data import Augment, DataError, ImageDataset, StreamSampler, collate_skip, open_source
from training.trainer import Trainer

from .conftest import tiny_overrides


@pytest.fixture
def with_corrupt(few_photos: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for src in sorted(few_photos.iterdir())[:3]:
        (folder / src.name).symlink_to(src.resolve())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return folder


def test_corrupt_image_is_skipped_and_counted(with_corrupt: Path) -> None:
    dataset = ImageDataset(open_source(with_corrupt), Augment(32))
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_skip, num_workers=1)
    images, skipped = next(iter(loader))
    assert skipped == 1 and images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8


def test_trainer_survives_and_counts_corrupt_images(with_corrupt: Path, tmp_path: Path) -> None:
    trainer = Trainer(build_config({}, tiny_overrides(with_corrupt, max_steps=4, **{"data.cache_in_memory": True})), tmp_path / "run")
    result = trainer.train()
    assert result.finished
    assert trainer.skipped_images == 4  # 4 steps × 4 samples = 16 = four passes over the 4 files, one broken each time


def test_parquet_and_tar_sources(cifar_test_parquet: Path, few_photos: Path, tmp_path: Path) -> None:
    parquet = open_source(cifar_test_parquet)
    assert len(parquet) == 10_000
    item = ImageDataset(parquet, Augment(32, "center_crop", flip=False))[0]
    assert item is not None and item.shape == (3, 32, 32)

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, src in enumerate(sorted(few_photos.iterdir())[:3]):
            tar.add(src.resolve(), arcname=f"{i:06d}.jpg")
            cls = tmp_path / f"{i}.cls"
            cls.write_text(str(i))
            tar.add(cls, arcname=f"{i:06d}.cls")
    source = open_source(tmp_path)  # a folder of shards
    assert len(source) == 3
    a = ImageDataset(source, Augment(64, "center_crop", flip=False))[1]
    b = ImageDataset(open_source(few_photos), Augment(64, "center_crop", flip=False))[1]
    assert a is not None and b is not None and torch.equal(a, b)


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nope")
    with pytest.raises(DataError, match="no images"):
        open_source(tmp_path)


def test_stream_sampler_resumes_mid_epoch_and_shards_ranks() -> None:
    full = [next(it) for it in [iter(StreamSampler(5, seed=3))] for _ in range(12)]
    again = iter(StreamSampler(5, seed=3, start=7))
    assert [next(again) for _ in range(5)] == full[7:12]
    assert sorted(i for i, _ in full[:5]) == list(range(5))  # each epoch is a permutation
    r0, r1 = iter(StreamSampler(5, seed=3, rank=0, world=2)), iter(StreamSampler(5, seed=3, rank=1, world=2))
    interleaved = [x for _ in range(3) for x in (next(r0), next(r1))]
    assert interleaved == full[:6]


def test_augmentation_depends_on_position_not_worker(few_photos: Path) -> None:
    dataset = ImageDataset(open_source(few_photos), Augment(64))
    a, b, c = dataset[(0, 10)], dataset[(0, 10)], dataset[(0, 11)]
    assert a is not None and b is not None and c is not None
    assert torch.equal(a, b) and not torch.equal(a, c)
