"""An imported diffusers VQModel served like vqtok's own (issue 28): a small seeded MoVQ-shaped VQModel
(`tests/models/test_import_diffusers.py` builds it), imported with `models.importers.diffusers`, then

- served by a real `vqtok serve` (a subprocess on a free port): `/v1/models` lists it with its `source`;
  `POST /v1/encode` gives diffusers' ids (`VQModel.encode` -> `VQModel.quantize`) on real photos
  (>= 99.9 %, argmin near-ties counted apart), `POST /v1/decode` of diffusers' ids is >= 45 dB from
  `VQModel.decode`;
- `vqtok tokenize --model DIR` on a folder of the same photos writes the server's ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from diffusers import VQModel

from clients.client import Client
from clients.tokenize.format import load_tokens
from models.core.gate import psnr_uint8
from models.export.graphs import output_to_images
from models.importers.diffusers import ImportResult, import_vqmodel
from tests.helpers import _wait_until_up, free_port
from tests.models.test_import_diffusers import (
    FAMILIES,
    PARITY_SIZE,
    RESOLUTION,
    assert_ids,
    build_vqmodel,
    decode_ids_with_diffusers,
    id_figures,
    photos,
    reference,
)

REPO = Path(__file__).resolve().parents[2]
NAME = "movq-tiny"
FAMILY = "movq-f8"  # attention at the lowest level, decoder norms modulated by the codes: the most involved family


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, photos_val_dir: Path) -> Path:
    """The VQModel as users download it (config.json + safetensors), calibrated on photos the checks do not use."""
    d = tmp_path_factory.mktemp("diffusers") / FAMILY
    build_vqmodel(FAMILIES[FAMILY].kwargs, photos(photos_val_dir, "*.jpg", 4, 64, offset=100)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def imported(source: Path, tmp_path_factory: pytest.TempPathFactory, kodak_dir: Path) -> ImportResult:
    repo = tmp_path_factory.mktemp("repo")
    return import_vqmodel(str(source), name=NAME, output=repo, resolution=RESOLUTION, parity_images=kodak_dir, progress=False)


@pytest.fixture(scope="module")
def real_photos(kodak_dir: Path, photos_val_dir: Path) -> np.ndarray:
    """4 Kodak and 4 held-out photos256 images, 128×128 uint8 (B, H, W, 3)."""
    return np.concatenate([photos(kodak_dir, "*.png", 4, PARITY_SIZE), photos(photos_val_dir, "*.jpg", 4, PARITY_SIZE)])


@pytest.fixture(scope="module")
def diffusers_reference(source: Path, real_photos: np.ndarray) -> dict[str, torch.Tensor]:
    """diffusers on the photos: latents, ids of encode -> quantize, and decode of those ids (uint8)."""
    vq = VQModel.from_pretrained(source).eval()
    latents, ids, _ = reference(vq, real_photos)
    decoded = output_to_images(decode_ids_with_diffusers(vq, ids))
    return {"latents": latents, "ids": ids, "decoded": decoded, "codebook": vq.quantize.embedding.weight.detach()}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VQTOK_")}
    return env | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def served(imported: ImportResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vqtok serve` on the repository the import wrote, in its own process, on a free port."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--model-repo", str(imported.model_dir.parent), "--port", str(port), "--device", "cpu", "--warmup-sizes", "64"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vqtok", "serve", *args, "--intra-op-threads", "2", "--log-format", "text"],
            cwd=REPO,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        if not _wait_until_up(url, ready=True, timeout=180):
            pytest.fail(f"vqtok serve did not become ready on {url}:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_the_server_lists_it_with_its_source(served: str, imported: ImportResult, source: Path) -> None:
    with Client(served) as client:
        assert NAME in {card.name for card in client.models()}
    body = httpx.get(f"{served}/v1/models", timeout=30).json()
    entry = next(m for m in body["models"] if m["name"] == NAME)
    assert entry["ready"] and entry["codebook_size"] == 512 and entry["downsample"] == 8 and entry["quantizer"] == "vq"
    assert entry["source"]["format"] == "diffusers" and entry["source"]["path"] == str(source.resolve())
    config = json.loads((imported.model_dir / "config.json").read_text())
    assert entry["source"] == config["source"]


def test_server_ids_and_decodes_match_diffusers(served: str, real_photos: np.ndarray, diffusers_reference: dict[str, torch.Tensor]) -> None:
    ref = diffusers_reference
    with Client(served) as client:
        grids = client.encode(list(real_photos), model=NAME, resize="none")
        decoded = client.decode(ref["ids"].numpy().astype(np.int32), model=NAME, output="numpy")
    ours = torch.from_numpy(np.stack(grids)).long()
    fig = id_figures(ours, ref["ids"], ref["latents"], ref["codebook"])
    assert len(ref["ids"].unique()) > 8  # a real decision: many codes in use
    fig["decode_db"] = min(psnr_uint8(np.asarray(d), r) for d, r in zip(decoded, ref["decoded"].numpy(), strict=True))
    print(f"\nserved {NAME}: {json.dumps(fig)}")
    assert_ids(fig)
    assert fig["decode_db"] >= 45


def test_vqtok_tokenize_writes_the_same_ids(
    served: str, imported: ImportResult, real_photos: np.ndarray, diffusers_reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(real_photos):
        Image.fromarray(img).save(folder / f"{i:02d}.png")  # lossless: the very pixels diffusers saw
    out = tmp_path / "tokens"
    args = ["--input", str(folder), "--output", str(out), "--model", str(imported.model_dir), "--resize", "none"]
    result = subprocess.run(
        [sys.executable, "-m", "vqtok", "tokenize", *args, "--device", "cpu", "--precision", "fp32", "--no-progress"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = load_tokens(out)
    assert data.keys == [f"{i:02d}.png" for i in range(len(real_photos))]
    tokens = torch.from_numpy(np.stack(data.grids)).long()
    ref = diffusers_reference
    fig = id_figures(tokens, ref["ids"], ref["latents"], ref["codebook"])
    print(f"\nvqtok tokenize {NAME}: {json.dumps(fig)}")
    assert_ids(fig)
    with Client(served) as client:  # the server's ids, exactly: the same fp32 graphs
        assert np.array_equal(np.stack(client.encode(list(real_photos), model=NAME, resize="none")), tokens.numpy())
