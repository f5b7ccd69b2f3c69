"""The compiled runtime on a CUDA device (skipped without one; run on the GPU host by scripts/gpu/serving.sh
check): calls from several threads at once, which overlap on the device (`_Graph.run` lets go of a
graph's lock once its work is queued), give exactly the tokens and pixels of the same calls one at a
time, with padded batches among them."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "pretrained" / "photo-f8-simvq-16k-v2"


@pytest.fixture(scope="module")
def runtime():  # type: ignore[no-untyped-def]
    from models.runtime.choose import load_runtime
    from models.runtime.compiled import compiled_available

    if compiled_available() is not None:
        pytest.skip(compiled_available())
    rt = load_runtime(MODEL, runtime="compiled", max_batch_size=16)
    rt.warmup([(256, 256)], [4, 16])
    yield rt
    rt.close()


def _photos(folder: Path, n: int) -> np.ndarray:
    files = sorted(folder.glob("*.jpg"))[:n]
    assert len(files) == n, f"{folder} holds fewer than {n} JPEGs"
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((256, 256))) for f in files])


def test_concurrent_calls_match_one_at_a_time(runtime, photos_val_dir: Path) -> None:  # type: ignore[no-untyped-def]
    images = _photos(photos_val_dir, 48)
    # batch sizes that pad (3 -> 4, 5 -> 8: the gate warmed 8, 11 -> 16) and fill (4, 16) their graphs; different images in each
    sizes = [16, 3, 16, 5, 4, 11, 16, 4, 3, 16, 5, 11] * 2
    rng = np.random.default_rng(0)
    batches = [images[rng.choice(len(images), size=s, replace=False)] for s in sizes]
    alone = [runtime.encode(b) for b in batches]
    with cf.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(runtime.encode, batches))
    for a, t, b in zip(alone, together, batches, strict=True):
        assert t.shape == (len(b), 32, 32)
        np.testing.assert_array_equal(a, t)  # the same graphs as one at a time: bit for bit
    pixels_alone = [runtime.decode(t) for t in alone]
    with cf.ThreadPoolExecutor(4) as pool:
        pixels_together = list(pool.map(runtime.decode, alone))
    for a, t in zip(pixels_alone, pixels_together, strict=True):
        np.testing.assert_array_equal(a, t)
    # and the answers are the images' own, not another call's (a clobbered buffer would give those): the
    # first image alone (padded to a graph of another batch size, whose fp16 kernels may differ) agrees
    # on nearly every position (measured: 1 of 1,024 differed once on an H200), another image's on ~none
    for b, t in zip(batches, together, strict=True):
        assert (runtime.encode(b[:1])[0] == t[0]).mean() >= 0.99


def test_answers_outlive_later_calls(runtime, photos_val_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """An answer lives in pinned memory of its own: later calls on the same graph do not overwrite it."""
    images = _photos(photos_val_dir, 32)
    first = runtime.encode(images[:16])
    kept = first.copy()
    for _ in range(5):
        runtime.encode(images[16:32])
    np.testing.assert_array_equal(first, kept)


def test_a_caller_on_its_own_stream_gets_its_own_answers(runtime, photos_val_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The runtime enqueues on the device's default stream whatever stream the calling thread has set, so
    a caller inside `torch.cuda.stream(...)` running beside others still gets the answers of one at a time."""
    images = _photos(photos_val_dir, 32)
    batches = [images[i : i + s] for i, s in zip((0, 4, 8, 16, 20, 24), (4, 3, 5, 4, 3, 8), strict=True)]
    alone = [runtime.decode(runtime.encode(b)) for b in batches]

    def on_side_stream(b: np.ndarray) -> np.ndarray:
        with torch.cuda.stream(torch.cuda.Stream()):
            return runtime.decode(runtime.encode(b))

    with cf.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(on_side_stream, batches))
    for a, t in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, t)
