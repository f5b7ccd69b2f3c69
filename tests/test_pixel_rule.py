"""One pixel rule: the same image file gives identical uint8 pixels through training's loader, the
export parity gate, dataset tokenization and the service (models/core/pixels.py is the rule).

Four awkward files: a JPEG whose EXIF orientation rotates it, an RGBA PNG, a greyscale PNG and a
16-bit greyscale PNG. The expected pixels are built independently (numpy, no Pillow conversion).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import ServerThread, exported_model_repo

H, W = 48, 64  # multiples of the test model's f = 4; the rotated JPEG becomes 64×48


def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)


def _files(folder: Path) -> dict[str, np.ndarray]:
    """Writes the four files; returns the pixels each must decode to."""
    expected: dict[str, np.ndarray] = {}
    # 1. JPEG stored landscape with EXIF orientation 6 (rotate 90° clockwise to display): the rule
    #    shows it portrait. Expected: the decoded stored pixels rotated, by numpy.
    stored = _gradient(H, W)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif)
    (folder / "a_rotated.jpg").write_bytes(buf.getvalue())
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        decoded = np.asarray(im.convert("RGB"))
    expected["a_rotated.jpg"] = np.rot90(decoded, k=-1)  # 90° clockwise
    # 2. RGBA: composited on white, (c·a + 255·(255 − a)) / 255, rounded
    rgba = np.concatenate([_gradient(H, W), np.tile(np.linspace(0, 255, W, dtype=np.uint8), (H, 1))[..., None]], axis=-1)
    Image.fromarray(rgba, "RGBA").save(folder / "b_rgba.png")
    a = rgba[..., 3:].astype(np.float64)
    expected["b_rgba.png"] = np.rint((rgba[..., :3] * a + 255.0 * (255.0 - a)) / 255.0).astype(np.uint8)
    # 3. 8-bit grey: replicated to three channels
    grey = _gradient(H, W)[..., 0]
    Image.fromarray(grey, "L").save(folder / "c_grey.png")
    expected["c_grey.png"] = np.repeat(grey[..., None], 3, axis=-1)
    # 4. 16-bit grey: scaled by 1/257 and rounded, then replicated
    grey16 = (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 21 % 65536).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "d_grey16.png")  # uint16 -> mode I;16
    expected["d_grey16.png"] = np.repeat(np.rint(grey16 / 257.0).astype(np.uint8)[..., None], 3, axis=-1)
    return expected


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("pixel-rule")
    return folder, _files(folder)


@pytest.fixture(scope="module")
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_model_repo(request, tmp_path_factory, {"tiny": "cifar-fsq"}) / "tiny"


def test_the_rule_itself(files: tuple[Path, dict[str, np.ndarray]]) -> None:
    from models.core import pixels

    folder, expected = files
    for name, want in expected.items():
        got = pixels.decode_pixels((folder / name).read_bytes())
        np.testing.assert_array_equal(got, want, err_msg=name)  # JPEG: decoded by the same libjpeg both ways


def test_training_loader_and_evaluation(files: tuple[Path, dict[str, np.ndarray]]) -> None:
    from training.data import Augment, ImageDataset, iter_images, open_source

    folder, expected = files
    evaluated = dict(iter_images(folder))
    source = open_source(folder)
    for name, want in expected.items():
        np.testing.assert_array_equal(evaluated[name], want, err_msg=name)
        # the training loader's centre crop at the image's short side is a pure crop of the rule's pixels
        short = min(want.shape[:2])
        item = ImageDataset(source, Augment(short, "center_crop", flip=False))[source.files.index(name)]
        assert item is not None
        top, left = (want.shape[0] - short) // 2, (want.shape[1] - short) // 2
        np.testing.assert_array_equal(item.permute(1, 2, 0).numpy(), want[top : top + short, left : left + short], err_msg=name)


def test_export_parity_images(files: tuple[Path, dict[str, np.ndarray]]) -> None:
    from models.export.parity import real_parity_images

    folder, expected = files
    for name, want in expected.items():
        got = real_parity_images([folder / name], want.shape[:2], count=1)[0]
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_dataset_tokenization_and_the_service(files: tuple[Path, dict[str, np.ndarray]], tiny_model: Path, tmp_path: Path) -> None:
    """Tokenization decodes to the rule's pixels; the tokens it writes and those a real server answers
    are the runtime's tokens for exactly those pixels."""
    from clients.tokenize.decoding import prepare_item
    from clients.tokenize.encoders import RuntimeEncoder
    from clients.tokenize.format import read_tokens
    from clients.tokenize.local import tokenize_local
    from models.core.sources import open_source
    from models.runtime.onnx import ModelRuntime
    from service.settings import Settings

    folder, expected = files
    runtime = ModelRuntime.load(tiny_model, device="cpu")
    encoder = RuntimeEncoder(runtime)
    source = open_source(folder)
    for item in source.slice(0, len(source)):
        prepared = prepare_item(item, encoder.spec, "none")
        assert prepared.pixels is not None, prepared.error
        np.testing.assert_array_equal(prepared.pixels, expected[item.key], err_msg=item.key)
    want_tokens = {name: runtime.encode(px[None])[0] for name, px in expected.items()}

    tokenize_local(folder, tmp_path / "out", encoder, resize="none", progress=False)
    rows = read_tokens(tmp_path / "out").to_pylist()
    assert [r["key"] for r in rows] == sorted(expected)
    for r in rows:
        got = np.asarray(r["tokens"], dtype=np.int32).reshape(r["grid_h"], r["grid_w"])
        np.testing.assert_array_equal(got, want_tokens[r["key"]], err_msg=r["key"])

    settings: Any = Settings(model_repo=tiny_model.parent, device="cpu", warmup_sizes=[32], log_format="text")
    server = ServerThread(settings).start()
    try:
        for name, want in want_tokens.items():
            r = httpx.post(
                f"{server.url}/v1/encode", files={"images": (name, (folder / name).read_bytes())}, data={"resize": "none"}, timeout=60
            )
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(np.asarray(r.json()["images"][0]["tokens"], dtype=np.int32), want, err_msg=name)
    finally:
        server.stop()
