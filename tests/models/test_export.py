"""ONNX export: every quantizer family, parity with torch on real images, dynamic shapes, the
uint8/int32 contracts, and the parity gate refusing to write anything when it fails."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from models.core.artefacts import sha256_file
from models.export import driver as export_driver
from models.export import parity as export_parity
from models.export.driver import export_model
from models.export.graphs import images_to_input, output_to_images
from models.export.parity import ExportError, ParityBounds, psnr_uint8
from models.presets import create_tokenizer
from models.quantizers import VectorQuantizer
from models.runtime.onnx import ModelRuntime
from models.tokenizer import Tokenizer
from tests.helpers import exported_model_repo

TINY = dict(base_channels=8, norm_groups=4, num_res_blocks=1)
FAMILIES = {"vq-rotation": "cifar-vq-rotation", "simvq": "cifar-simvq", "fsq": "cifar-fsq"}
VQTOK = str(Path(sys.executable).parent / "vqtok")  # the installed console command


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory: pytest.TempPathFactory, kodak_dir: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The fsq family (seed 0) exported through the installed console command, `vqtok export --fp16`: the
    run `test_export_cli` checks, and the fsq model every other test here checks."""
    torch.manual_seed(0)
    d = create_tokenizer(FAMILIES["fsq"], **TINY).save_pretrained(tmp_path_factory.mktemp("fsq"))
    cmd = [VQTOK, "export", "--model", str(d), "--fp16", "--parity-images", str(kodak_dir)]
    return d, subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    kodak_dir: Path,
    cli_export: tuple[Path, subprocess.CompletedProcess[str]],
) -> dict[str, Path]:
    """Each family exported with its parity checked on Kodak, fsq with --fp16 too: vq-rotation here, fsq by
    the command (`cli_export`), simvq the suite's shared export (tests.helpers: the same call, seed 0 and
    TINY, in a subprocess), which other test modules use anyway."""
    fsq, run = cli_export
    assert run.returncode == 0, run.stderr
    simvq = exported_model_repo(request, tmp_path_factory, {"simvq": FAMILIES["simvq"]}) / "simvq"
    torch.manual_seed(0)
    rotation = create_tokenizer(FAMILIES["vq-rotation"], **TINY).save_pretrained(tmp_path_factory.mktemp("vq-rotation"))
    export_model(rotation, parity_images=kodak_dir)
    return {"vq-rotation": rotation, "simvq": simvq, "fsq": fsq}


def kodak_batch(kodak_dir: Path, h: int, w: int, n: int = 3) -> np.ndarray:
    imgs = []
    for p in sorted(kodak_dir.glob("*.png"))[:n]:
        with Image.open(p) as im:
            imgs.append(np.asarray(im.convert("RGB"))[:h, :w])
    return np.stack(imgs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_writes_checked_graphs_and_manifest(exported: dict[str, Path], family: str) -> None:
    d = exported[family]
    manifest = json.loads((d / "manifest.json").read_text())
    expected = {"encoder.onnx", "decoder.onnx", "config.json", "model.safetensors", "parity.npz"}  # parity.npz: the GPU gate's set
    if family == "fsq":
        expected |= {"encoder.fp16.onnx", "decoder.fp16.onnx"}
    assert set(manifest["files"]) == expected
    for name in expected:
        assert (d / name).is_file()
        assert manifest["files"][name]["sha256"] == sha256_file(d / name)
    for name in ("encoder.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(d / name), full_check=True)
    assert manifest["opset"] == 18 and manifest["grid"]["downsample"] == 4
    assert manifest["model"]["codebook_size"] in (1000, 1024)
    assert manifest["parity"]["real_images_checked"] is True
    assert manifest["revision"]
    enc = onnx.load(str(d / "encoder.onnx"))
    dec = onnx.load(str(d / "decoder.onnx"))
    u8, i32 = onnx.TensorProto.UINT8, onnx.TensorProto.INT32
    assert enc.graph.input[0].type.tensor_type.elem_type == u8
    assert enc.graph.output[0].type.tensor_type.elem_type == i32
    assert dec.graph.input[0].type.tensor_type.elem_type == i32
    assert dec.graph.output[0].type.tensor_type.elem_type == u8
    # batch, height and width are symbolic (dynamic) in both graphs
    for graph in (enc.graph, dec.graph):
        dims = graph.input[0].type.tensor_type.shape.dim
        assert all(dims[i].dim_param for i in range(3)), dims


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ort_matches_torch_on_real_images(exported: dict[str, Path], kodak_dir: Path, family: str, precision: str) -> None:
    if precision == "fp16" and family != "fsq":
        pytest.skip("exported without --fp16 (fp16 parity of untrained VQ nets is checked on the trained model)")
    d = exported[family]
    tok = Tokenizer.from_pretrained(d).eval()
    rt = ModelRuntime.load(d, device="cpu", precision=precision)  # type: ignore[arg-type]
    bounds = export_parity.PARITY[precision]
    for h, w in [(64, 96), (256, 256)]:  # two sizes through the same graphs
        images = kodak_batch(kodak_dir, h, w)
        ids = rt.encode(images)
        with torch.no_grad():
            ref_ids = tok.encode(images_to_input(torch.from_numpy(images)))
            ref_img = output_to_images(tok.decode(ref_ids)).numpy()
        assert ids.dtype == np.int32 and ids.shape == (3, h // 4, w // 4)
        assert (ids == ref_ids.numpy()).mean() >= bounds.min_token_agreement
        out = rt.decode(ref_ids.numpy())
        assert out.dtype == np.uint8 and out.shape == images.shape
        assert psnr_uint8(out, ref_img) >= bounds.min_decode_psnr_db


def test_chunked_codebook_search_in_graph(tmp_path: Path, kodak_dir: Path) -> None:
    """The graph splits the codebook into static chunks; the pick must still be torch's argmin."""
    torch.manual_seed(1)
    d = create_tokenizer("cifar-simvq", **TINY).save_pretrained(tmp_path / "m")
    export_model(d, parity_images=kodak_dir, search_chunk=300)  # 1024 codes -> 4 chunks
    tok = Tokenizer.from_pretrained(d).eval()
    images = kodak_batch(kodak_dir, 64, 64)
    ref = tok.encode(images_to_input(torch.from_numpy(images))).numpy()
    assert (ModelRuntime.load(d).encode(images) == ref).mean() >= 0.999


def test_parity_failure_aborts_and_writes_nothing(tmp_path: Path, kodak_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = create_tokenizer("cifar-fsq", **TINY).save_pretrained(tmp_path / "m")
    monkeypatch.setitem(export_parity.PARITY, "fp32", ParityBounds(min_token_agreement=1.01, min_decode_psnr_db=50.0))
    with pytest.raises(ExportError, match=r"(?s)parity check failed.*token agreement"):
        export_model(d, parity_images=kodak_dir)
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def twin_codebook_model(path: Path) -> Path:
    """A small VQ model whose codebook is two copies of the same 512 codes: ids i and i + 512 are exact ties."""
    torch.manual_seed(0)
    tok = create_tokenizer(FAMILIES["vq-rotation"], **TINY)
    q = tok.quantizer
    assert isinstance(q, VectorQuantizer)
    half = q.codebook_size // 2
    with torch.no_grad():
        codes = torch.randn(half, q.dim)
        q.embedding.copy_(torch.cat([codes, codes]))
    return tok.save_pretrained(path)


def with_other_ids(refs: dict[str, export_parity.Reference], k: int, step: int) -> dict[str, export_parity.Reference]:
    """`refs` with every other id replaced by (id + step) mod K: ORT's ids then differ from them there,
    by an exact tie (step = K/2 on `twin_codebook_model`: the twin code) or by a different code."""
    out = {}
    for label, ref in refs.items():
        every_other = (np.arange(ref.tokens.size) % 2 == 0).reshape(ref.tokens.shape)
        out[label] = dataclasses.replace(ref, tokens=np.where(every_other, (ref.tokens + step) % k, ref.tokens).astype(np.int32))
    return out


def test_parity_gate_excuses_near_ties_and_only_them(tmp_path: Path, kodak_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = twin_codebook_model(tmp_path / "m")

    def tied_references(tok: Tokenizer, image_sets: dict[str, np.ndarray]) -> dict[str, export_parity.Reference]:
        return with_other_ids(export_parity.torch_references(tok, image_sets), tok.codebook_size, step=512)

    monkeypatch.setattr(export_driver, "torch_references", tied_references)
    manifest = export_model(d, parity_images=kodak_dir)  # half the ids differ from the references, every one an exact tie
    bound = export_parity.PARITY["fp32"]
    for fig in manifest["parity"]["fp32"]["figures"].values():
        assert fig["token_agreement"] < 0.6 and fig["mismatches"] > 0
        assert fig["near_ties"] > 0 and fig["agreement_with_ties"] >= bound.min_token_agreement  # the ties are excused
    assert manifest["parity"]["fp32"]["near_tie_rule"] == export_parity.NEAR_TIE_RULE

    # the same graphs against references that differ by other codes: refused, the counts named
    tok = Tokenizer.from_pretrained(d).eval()
    sets = export_parity.parity_image_sets(tok.config, export_parity.find_parity_images(kodak_dir))
    refs = with_other_ids(export_parity.torch_references(tok, sets), tok.codebook_size, step=1)
    files = {"encoder": d / "encoder.onnx", "decoder": d / "decoder.onnx"}
    figures = export_parity.check_parity(files, "fp32", refs)
    bad = export_parity.parity_failures(figures, bound)
    for label, fig in figures.items():
        assert fig["near_ties"] == 0 and fig["agreement_with_ties"] == fig["token_agreement"] < 0.6
        line = f"{label}: token agreement {fig['token_agreement']:.4%} ({fig['mismatches']} differ, 0 of them near-ties)"
        assert any(b.startswith(line) and "with the ties excused < 99.9%" in b for b in bad), bad


def test_export_cli(cli_export: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    d, ok = cli_export
    assert ok.returncode == 0, ok.stderr
    assert "tokens" in ok.stdout and (d / "manifest.json").is_file()
    missing = subprocess.run([VQTOK, "export", "--model", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    broken = subprocess.run([VQTOK, "export", "--model", str(tmp_path / "broken")], capture_output=True, text=True, timeout=120)
    assert broken.returncode == 2 and "model.safetensors is missing" in broken.stderr
