"""Every model shipped in models/pretrained is served by its name from the shipped repository, with its
cards, and gives the same tokens over HTTP as the clients' local backend by the same name; the trained
ones reconstruct a real photo (a broken or untrained export would not)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from models.core.artefacts import DEFAULT_MODEL, pretrained_repo
from tests.helpers import ServerThread
from tests.service.conftest import cpu_settings, photo_crop, png_bytes

SHIPPED = sorted(p.name for p in pretrained_repo().iterdir() if (p / "manifest.json").is_file())
NPY = "application/x-npy"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def shipped_server() -> Iterator[ServerThread]:
    settings = cpu_settings(pretrained_repo(), default_model=None, warmup_sizes=[], intra_op_threads=2)
    s = ServerThread(settings).start(timeout=180)
    yield s
    s.stop()


def test_four_models_are_shipped_with_cards() -> None:
    assert {"photo-f8-simvq-16k", "photo-f8-simvq-16k-v2", "photo-f16-simvq-16k", "photo-f16-fsq-64k"} <= set(SHIPPED)
    for name in SHIPPED:
        d = pretrained_repo() / name
        card = (d / "README.md").read_text()
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta["library_name"] == "vqtok" and meta["license"], name
        assert f"# {name}" in card and "MODEL_CARD.md" in card, name
        assert f"# {name}" in (d / "MODEL_CARD.md").read_text(), name
        assert sum(f.stat().st_size for f in d.iterdir()) < 100 * 2**20, name  # the bound per model


def test_every_shipped_model_is_served_by_name(shipped_server: ServerThread, kodak_dir: Path) -> None:
    from clients.local import LocalBackend

    image = photo_crop(sorted(kodak_dir.glob("*.png"))[3], 256)
    with httpx.Client(base_url=shipped_server.url, timeout=120) as c:
        listed = c.get("/v1/models").json()
        assert sorted(m["name"] for m in listed["models"]) == SHIPPED
        assert listed["default_model"] == DEFAULT_MODEL
        for m in listed["models"]:
            config = json.loads((pretrained_repo() / m["name"] / "config.json").read_text())
            f = 2 ** (len(config["channel_mult"]) - 1)
            r = c.post("/v1/encode", params={"model": m["name"]}, files={"images": ("x.png", png_bytes(image))}, headers={"Accept": NPY})
            assert r.status_code == 200, r.text
            grid = np.load(io.BytesIO(r.content))[0]
            assert grid.shape == (256 // f, 256 // f) and grid.min() >= 0 and grid.max() < m["codebook_size"]
            with LocalBackend(m["name"], device="cpu", precision="fp32") as local:
                assert np.array_equal(local.encode(image, resize="crop"), grid), m["name"]
            r = c.post(
                "/v1/decode", params={"model": m["name"]}, content=_npy(grid[None]), headers={"Content-Type": NPY, "Accept": "image/png"}
            )
            assert r.status_code == 200, r.text
            out = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
            assert out.shape == image.shape
            # trained weights: the reconstruction is near the photo (an untrained network is below 12 dB here)
            assert psnr(out, image) > 17.0, (m["name"], psnr(out, image))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a.astype(np.int32))
    return buf.getvalue()
