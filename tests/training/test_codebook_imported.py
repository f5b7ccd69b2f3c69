"""`vqtok codebook retrain --quantizer simvq` on an imported model (issue 28 item 3): a small diffusers
VQModel (plain codebook, taming network) imported with `models.importers.diffusers`, its codebook
retrained as a SimVQ one (frozen C, learned W, rotation-trick gradients), its encoder and decoder reused;
the result loads, exports (ONNX parity with torch) and keeps its provenance."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from models.config import TokenizerConfig
from models.importers.diffusers import ImportResult, import_vqmodel
from models.quantizers import VectorQuantizer
from models.tokenizer import Tokenizer
from tests.models.test_import_diffusers import FAMILIES, build_vqmodel, photos
from training import commands
from training.codebook import RetrainOptions, retrain_codebook

FAMILY = "ldm-f4"  # quant_conv into another width (3 -> 4), K = 256 codes of 4 numbers
RESOLUTION = 64


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, photos_val_dir: Path, kodak_dir: Path) -> ImportResult:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    src = tmp_path_factory.mktemp("diffusers") / FAMILY
    build_vqmodel(FAMILIES[FAMILY].kwargs, photos(photos_val_dir, "*.jpg", 4, 64, offset=100)).save_pretrained(src)
    repo = tmp_path_factory.mktemp("repo")
    return import_vqmodel(
        str(src), name="tiny-ldm", output=repo, resolution=RESOLUTION, fp16=False, parity_images=kodak_dir, progress=False
    )


OPTS = dict(batch_size=4, resolution=RESOLUTION, eval_images=8, max_latents=8192, kmeans_iters=5, device="cpu")


def test_keeping_the_codes_as_simvq_changes_no_id(imported: ImportResult, few_photos: Path) -> None:
    """--init keep --quantizer simvq: the basis is the old codebook and W = I, so the same codes, now SimVQ."""
    tok = Tokenizer.from_pretrained(imported.model_dir)
    new, report = retrain_codebook(tok, str(few_photos), RetrainOptions(init="keep", quantizer="simvq", steps=0, **OPTS))  # type: ignore[arg-type]
    assert report["converted_to_simvq"] and report["quantizer"] == "simvq"
    kept = report["candidates"]["kept codes as SimVQ"]
    assert kept["usage"] == report["before"]["usage"] and abs(kept["psnr"] - report["before"]["psnr"]) < 1e-3
    x = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    assert torch.equal(new.encode(x), tok.encode(x))


def test_an_imported_codebook_retrained_as_simvq(imported: ImportResult, few_photos: Path, tmp_path: Path) -> None:
    """The command on the imported directory: 256 -> 64 codes as SimVQ; encoder and decoder reused
    bit for bit, the config switched (linear_codebook, rotation), the source kept; it loads and exports."""
    parser = argparse.ArgumentParser(prog="vqtok")
    commands.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "tiny-ldm-simvq"
    argv = f"codebook retrain --model {imported.model_dir} --data {few_photos} --out {out} --quantizer simvq --codebook-size 64 "
    argv += f"--steps 20 --restart-every 5 --batch-size 4 --resolution {RESOLUTION} --eval-images 8 --max-latents 8192 "
    argv += "--kmeans-iters 5 --device cpu --no-progress"
    args = parser.parse_args(argv.split())
    assert args.handler(args) == 0
    report = json.loads((out / "retrain_report.json").read_text())
    assert report["converted_to_simvq"] and report["codebook_size_before"] == 256 and report["codebook_size"] == 64

    old = TokenizerConfig.load(imported.model_dir / "config.json")
    config = TokenizerConfig.load(out / "config.json")
    assert config.architecture == "taming" and config.linear_codebook and config.gradient == "rotation"
    assert config == old.replace(codebook_size=64, linear_codebook=True, gradient="rotation")
    assert config.source == old.source and config.source["format"] == "diffusers"

    before, new = Tokenizer.from_pretrained(imported.model_dir), Tokenizer.from_pretrained(out)
    for part in ("encoder", "decoder"):
        theirs = getattr(before, part).state_dict()
        ours = getattr(new, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in ours.items()), part
    q = new.quantizer
    assert isinstance(q, VectorQuantizer) and q.linear_codebook and q.gradient == "rotation" and q.basis.shape == (64, 4)
    km = report["candidates"]["k-means"]
    assert km["usage"] >= 0.9, report["candidates"]  # every code of the k-means codebook in use on held-out photos
    assert report["after"] == report["candidates"][report["kept"]]
    assert report["after"]["psnr"] == max(c["psnr"] for c in report["candidates"].values())

    from models.export.driver import export_model

    manifest = export_model(out, fp16=False, progress=False)  # ONNX graphs with the SimVQ codebook folded in, parity checked
    assert manifest["model"]["codebook_size"] == 64 and (out / "encoder.onnx").is_file()
