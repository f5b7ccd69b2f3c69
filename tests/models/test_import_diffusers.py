"""`vqtok import diffusers:...`: small diffusers VQModels (seeded random weights, a codebook spread over
the latents so that the nearest code is a real decision) saved as users download them, imported,
and checked against diffusers itself on real photos: ids of `VQModel.encode` -> `VQModel.quantize`,
decodes of `VQModel.decode`, through the torch Tokenizer and the exported ONNX graphs. No network:
hub ids come from a hub cache built here, offline."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.core import pixels
from models.core.artefacts import open_exported
from models.core.gate import psnr_uint8

diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

from diffusers import VQModel  # noqa: E402

from models.config import ConfigError, TokenizerConfig  # noqa: E402
from models.export.graphs import images_to_input, output_to_images  # noqa: E402
from models.importers import commands  # noqa: E402
from models.importers.diffusers import ImportFailed, ImportResult, UnsupportedModel, import_vqmodel, vqtok_state_dict  # noqa: E402
from models.quantizers.functional import near_ties  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
D, AD, U, AU = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"
RESOLUTION = 64  # the imported models' native size: the export's parity sets stay small
PARITY_SIZE = 128  # the photos the parity tests crop
# The near-tie rule of models/quantizers/functional.py, written out again per position below: a mismatch of
# codes a, b is a tie when |da − db| <= 2·TIE_LATENT·s·‖ea − eb‖ + TIE_SEARCH·(‖z‖² + max ‖e‖²), s the RMS latent norm.
TIE_LATENT, TIE_SEARCH = 1e-5, 8 * 2.0**-24


@dataclass(frozen=True)
class Family:
    """A small VQModel shaped like one public family (widths cut down so each test runs in seconds)."""

    kwargs: dict[str, Any]
    fp16: bool  # the import exports float16 graphs (not where the source sets force_upcast)


FAMILIES = {
    # latent-diffusion VQ-f4: no attention in the levels, quant_conv into another width (3 -> 4), GELU blocks
    "ldm-f4": Family(
        dict(
            block_out_channels=(32, 32, 64),
            down_block_types=(D, D, D),
            up_block_types=(U, U, U),
            latent_channels=3,
            vq_embed_dim=4,
            num_vq_embeddings=256,
            act_fn="gelu",
        ),
        fp16=True,
    ),
    # Kandinsky's MoVQ, f8: attention at the lowest level, decoder norms modulated by the codes
    "movq-f8": Family(
        dict(
            block_out_channels=(32, 32, 64, 64),
            down_block_types=(D, D, D, AD),
            up_block_types=(AU, U, U, U),
            latent_channels=4,
            vq_embed_dim=4,
            num_vq_embeddings=512,
            norm_type="spatial",
        ),
        fp16=True,
    ),
    # aMUSEd's VQGAN, f16: no mid-block attention, ids looked up by diffusers' decode, float32 only
    "amused-f16": Family(
        dict(
            block_out_channels=(32, 32, 64, 64, 64),
            down_block_types=(D,) * 5,
            up_block_types=(U,) * 5,
            latent_channels=32,
            num_vq_embeddings=1024,
            mid_block_add_attention=False,
            lookup_from_codebook=True,
            force_upcast=True,
        ),
        fp16=False,
    ),
}


def build_vqmodel(kwargs: dict[str, Any], calibration: np.ndarray, seed: int = 0) -> VQModel:
    """A seeded VQModel whose codebook is drawn from the latents' own per-channel statistics on
    `calibration` photos: diffusers' init (uniform ±1/K) puts every code next to the origin, where
    all latents see near-equal distances and the argmin is noise."""
    torch.manual_seed(seed)
    vq = VQModel(layers_per_block=1, norm_num_groups=8, **kwargs).eval()
    with torch.no_grad():
        z = vq.encode(images_to_input(torch.from_numpy(calibration))).latents  # (B, D, h, w)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        g = torch.Generator().manual_seed(seed + 1)
        k = vq.quantize.n_e
        codes = flat.mean(0) + flat.std(0) * torch.randn(k, flat.shape[1], generator=g)
        vq.quantize.embedding.weight.copy_(codes)
    return vq


def photos(directory: Path, pattern: str, count: int, size: int, offset: int = 0) -> np.ndarray:
    """uint8 (count, size, size, 3): real photos fitted by the pixel rule (cover + centre crop)."""
    paths = sorted(directory.glob(pattern))[offset : offset + count]
    out = []
    for p in paths:
        im, _ = pixels.decode_image(p.read_bytes())
        out.append(np.asarray(pixels.fit(im, size, size), dtype=np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def test_photos(kodak_dir: Path, photos_val_dir: Path) -> np.ndarray:
    """The parity tests' photos: 4 Kodak and 4 held-out photos256 images, 128×128."""
    return np.concatenate([photos(kodak_dir, "*.png", 4, PARITY_SIZE), photos(photos_val_dir, "*.jpg", 4, PARITY_SIZE)])


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, photos_val_dir: Path) -> dict[str, Path]:
    """Each family saved with `save_pretrained`: the folder users download (config.json + safetensors).
    Calibrated on photos the parity tests do not use."""
    calibration = photos(photos_val_dir, "*.jpg", 4, 64, offset=100)
    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for name, family in FAMILIES.items():
        build_vqmodel(family.kwargs, calibration).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def imported(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, kodak_dir: Path) -> dict[str, ImportResult]:
    repo = tmp_path_factory.mktemp("repo")
    out = {}
    for name, src in sources.items():
        start = time.perf_counter()
        out[name] = import_vqmodel(str(src), name=name, output=repo, resolution=RESOLUTION, parity_images=kodak_dir, progress=False)
        print(f"\nimport {name}: {time.perf_counter() - start:.1f} s {json.dumps({k: round(v, 2) for k, v in out[name].seconds.items()})}")
    return out


def reference(vq: VQModel, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusers on uint8 images: (latents, ids of VQModel.encode -> VQModel.quantize, VQModel.decode of them)."""
    x = images_to_input(torch.from_numpy(images))
    with torch.no_grad():
        latents = vq.encode(x).latents
        _, _, (_, _, ids) = vq.quantize(latents)
        ids = ids.reshape(latents.shape[0], *latents.shape[2:])
        decoded = vq.decode(latents).sample
    return latents, ids, decoded


def decode_ids_with_diffusers(vq: VQModel, ids: torch.Tensor) -> torch.Tensor:
    """diffusers' `VQModel.decode` of token ids: the ids themselves where it looks codes up
    (lookup_from_codebook, aMUSEd's pipeline), else the codebook rows they name."""
    b, h, w = ids.shape
    weight = vq.quantize.embedding.weight
    with torch.no_grad():
        if vq.config["lookup_from_codebook"]:
            return vq.decode(ids.reshape(-1), force_not_quantize=True, shape=(b, h, w, weight.shape[1])).sample
        codes = weight[ids.reshape(-1)].reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return vq.decode(codes, force_not_quantize=True).sample


def distance_gaps(latents: torch.Tensor, codebook: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> list[float]:
    """At each mismatch, the two codes' squared-distance gap to diffusers' latent (float64) over what a float32
    rounding could make of it (the tie rule above): <= 1 is a near-tie."""
    z_all = latents.double()
    s = float(z_all.pow(2).sum(1).mean().sqrt())  # RMS latent norm over the set
    gaps = []
    for b, i, j in (ours != theirs).nonzero().tolist():
        z = z_all[b, :, i, j]
        ea, eb = codebook[ours[b, i, j]].double(), codebook[theirs[b, i, j]].double()
        da, db = float((z - ea).pow(2).sum()), float((z - eb).pow(2).sum())
        slack = 2 * TIE_LATENT * s * float((ea - eb).norm()) + TIE_SEARCH * float(z.pow(2).sum() + max(ea.pow(2).sum(), eb.pow(2).sum()))
        gaps.append(abs(da - db) / slack)
    return gaps


def count_ties(latents: torch.Tensor, codebook: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> int:
    """Mismatches a float32 rounding could have made (the tie rule above)."""
    return sum(g <= 1 for g in distance_gaps(latents, codebook, ours, theirs))


def psnr_float(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.clamp(-1, 1).double() - b.clamp(-1, 1).double()).pow(2).mean())
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(4.0 / mse))


def id_figures(ours: torch.Tensor, theirs: torch.Tensor, latents: torch.Tensor, codebook: torch.Tensor) -> dict[str, Any]:
    gaps = distance_gaps(latents, codebook, ours, theirs)
    total = ours.numel()
    return {
        "agreement": 1 - len(gaps) / total,
        "mismatches": len(gaps),
        "ties": sum(g <= 1 for g in gaps),
        "tokens": total,
        "largest_gap": max(gaps, default=0.0),  # the least close mismatch's gap over the tie rule's slack
    }


def assert_ids(fig: dict[str, Any]) -> None:
    """>= 99.9 % of ids equal to diffusers', the mismatches that are near-ties excused (counted, reported)."""
    assert 1 - (fig["mismatches"] - fig["ties"]) / fig["tokens"] >= 0.999, fig


# --- the model directory ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_writes_an_ordinary_model_directory(imported: dict[str, ImportResult], sources: dict[str, Path], name: str) -> None:
    result = imported[name]
    d = result.model_dir
    graphs = {"encoder.onnx", "decoder.onnx"} | ({"encoder.fp16.onnx", "decoder.fp16.onnx"} if FAMILIES[name].fp16 else set())
    assert {p.name for p in d.iterdir()} == {
        "config.json",
        "model.safetensors",
        "manifest.json",
        "parity.npz",
        "README.md",
        "MODEL_CARD.md",
    } | graphs
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".import-")]  # the staging folder is gone
    config = TokenizerConfig.load(d / "config.json")
    raw = json.loads((sources[name] / "config.json").read_text())
    assert config.architecture == "taming" and config.downsample == 2 ** (len(raw["block_out_channels"]) - 1)
    assert config.codebook_size == raw["num_vq_embeddings"] and config.latent_channels == raw["latent_channels"]
    assert config.latent_dim == (raw["vq_embed_dim"] or raw["latent_channels"]) and not config.linear_codebook
    assert config.norm_type == raw["norm_type"] and config.attention == raw["mid_block_add_attention"]
    assert config.source["format"] == "diffusers" and config.source["path"] == str(sources[name].resolve())
    assert config.source["force_upcast"] == raw["force_upcast"] and "license" not in config.source  # no card, no licence
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["precisions"] == (["fp32", "fp16"] if FAMILIES[name].fp16 else ["fp32"])
    assert manifest["model"]["codebook_size"] == config.codebook_size and manifest["model"]["downsample"] == config.downsample
    assert open_exported(d, verify=True).info.codebook_size == config.codebook_size  # what the service reads
    front = (d / "README.md").read_text().split("---\n")[1]
    assert "library_name: vqtok" in front and "license: other" in front
    card = (d / "MODEL_CARD.md").read_text()
    assert f"vqtok import diffusers:{sources[name].resolve()} --name {name}" in card and "near-ties" in card
    assert Tokenizer.from_pretrained(d).config == config


# --- parity with diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_torch_tokenizer_reproduces_diffusers(
    imported: dict[str, ImportResult], sources: dict[str, Path], test_photos: np.ndarray, name: str
) -> None:
    vq = VQModel.from_pretrained(sources[name]).eval()
    tok = Tokenizer.from_pretrained(imported[name].model_dir).eval()
    latents, theirs, their_decode = reference(vq, test_photos)
    x = images_to_input(torch.from_numpy(test_photos))
    ours = tok.encode(x)
    fig = id_figures(ours, theirs, latents, vq.quantize.embedding.weight.detach())
    assert fig["agreement"] > 0.5 and len(theirs.unique()) > 8  # a real decision: many codes in use
    our_decode = tok.decode(ours)
    fig["decode_db_same_ids"] = psnr_float(our_decode, decode_ids_with_diffusers(vq, ours))
    fig["decode_db_end_to_end"] = psnr_float(our_decode, their_decode)
    print(f"\ntorch {name}: {json.dumps(fig)}")
    assert_ids(fig)
    assert fig["decode_db_same_ids"] >= 45 and fig["decode_db_end_to_end"] >= (45 if fig["mismatches"] == 0 else 30)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_onnx_graphs_reproduce_diffusers(
    imported: dict[str, ImportResult], sources: dict[str, Path], test_photos: np.ndarray, name: str
) -> None:
    vq = VQModel.from_pretrained(sources[name]).eval()
    latents, theirs, _ = reference(vq, test_photos)
    their_decode = output_to_images(decode_ids_with_diffusers(vq, theirs)).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    d = imported[name].model_dir
    precisions = {"fp32": ("encoder.onnx", "decoder.onnx")}
    if FAMILIES[name].fp16:
        precisions["fp16"] = ("encoder.fp16.onnx", "decoder.fp16.onnx")
    for precision, (enc_file, dec_file) in precisions.items():
        enc = ort.InferenceSession(str(d / enc_file), opts, providers=["CPUExecutionProvider"])
        dec = ort.InferenceSession(str(d / dec_file), opts, providers=["CPUExecutionProvider"])
        ids = torch.from_numpy(enc.run(None, {"images": test_photos})[0]).long()
        decoded = dec.run(None, {"tokens": theirs.numpy().astype(np.int32)})[0]  # diffusers' ids, decoded by ONNX
        fig = id_figures(ids, theirs, latents, vq.quantize.embedding.weight.detach())
        fig["decode_db"] = psnr_uint8(decoded, their_decode)
        print(f"\nonnx {precision} {name}: {json.dumps(fig)}")
        if precision == "fp32":
            assert_ids(fig)
            assert fig["decode_db"] >= 45
        else:  # float16 networks: reported; the export's own gate holds them to torch (>= 99 %, >= 40 dB)
            assert fig["agreement"] >= 0.95 and fig["decode_db"] >= 35


def test_the_local_backend_runs_an_imported_model(imported: dict[str, ImportResult], test_photos: np.ndarray) -> None:
    """Nothing downstream tells an imported model from a trained one: the clients' local backend (ONNX Runtime)."""
    from clients.local import LocalBackend

    result = imported["movq-f8"]
    enc = ort.InferenceSession(str(result.model_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    with LocalBackend(str(result.model_dir), device="cpu", precision="fp32") as backend:
        grid = backend.encode(test_photos[0], resize="none")  # the photo as it is, as the session below sees it
        assert backend.info.codebook_size == 512
    assert np.array_equal(grid, enc.run(None, {"images": test_photos[:1]})[0][0])


# --- hub ids, offline -----------------------------------------------------------------------------


def hub_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """`files` (paths inside the repository) laid out as huggingface_hub caches a download at `main`."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def run_import_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`vqtok import ...` in a fresh interpreter (huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE at import),
    through the command module's own parser registration, as the root CLI registers it."""
    code = (
        "import argparse, sys\n"
        "from models.core.errors import CLIError\n"
        "from models.importers import commands\n"
        "parser = argparse.ArgumentParser(prog='vqtok'); sub = parser.add_subparsers(dest='command', required=True)\n"
        "commands.register(sub); args = parser.parse_args(sys.argv[1:])\n"
        "try:\n    sys.exit(args.handler(args))\n"
        "except CLIError as exc:\n    print(f'vqtok import: error: {exc}', file=sys.stderr); sys.exit(exc.code)\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=base | env, capture_output=True, text=True, timeout=540)


def test_import_by_hub_id_from_the_cache_offline(sources: dict[str, Path], tmp_path: Path, kodak_dir: Path) -> None:
    src = sources["ldm-f4"]
    card = b"---\nlicense: apache-2.0\n---\n# tiny-vq\n"
    files = {f"vqvae/{p.name}": p.read_bytes() for p in src.iterdir()} | {"README.md": card}
    hub = tmp_path / "hub"
    hub_cache(hub, "someorg/tiny-vq", files)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "repo"
    common = ["--output", str(out), "--resolution", str(RESOLUTION), "--no-fp16", "--parity-images", str(kodak_dir)]
    result = run_import_cli(["import", "diffusers:someorg/tiny-vq", "--subfolder", "vqvae", "--name", "tiny-vq", *common], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nimport by hub id: {report['seconds']}")
    assert report["model"] == str(out / "tiny-vq") and "encoder.onnx" in report["files"] and "encoder.fp16.onnx" not in report["files"]
    assert "diffusers parity: ids 100.0000%" in result.stdout
    config = TokenizerConfig.load(out / "tiny-vq" / "config.json")
    assert config.source["id"] == "someorg/tiny-vq" and config.source["subfolder"] == "vqvae" and config.source["commit"] == COMMIT
    assert config.source["license"] == "apache-2.0" and "path" not in config.source
    front = (out / "tiny-vq" / "README.md").read_text().split("---\n")[1]
    assert "license: apache-2.0" in front and "base_model: someorg/tiny-vq" in front
    # the hub's copy of the weights, renamed: the network diffusers loads
    expected = vqtok_state_dict(VQModel.from_pretrained(src).state_dict())
    imported_state = Tokenizer.from_pretrained(out / "tiny-vq").state_dict()
    assert imported_state.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in imported_state.items())
    # an id the cache does not hold: one clear line, exit 2, nothing written
    missing = run_import_cli(["import", "diffusers:someorg/other", "--subfolder", "vqvae", "--name", "other", *common], env, tmp_path)
    assert missing.returncode == 2, missing.stderr[-3000:]
    line = missing.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("vqtok import: error: someorg/other (subfolder vqvae): cannot read its config.json")
        and "Traceback" not in missing.stderr
    )
    assert not (out / "other").exists()


# --- what vqtok cannot represent ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("small") / "vq"
    VQModel(block_out_channels=(32, 32, 32), down_block_types=(D,) * 3, up_block_types=(U,) * 3, norm_num_groups=8).save_pretrained(d)
    return d


def patched(source: Path, tmp_path: Path, changes: dict[str, Any]) -> Path:
    d = tmp_path / "patched"
    d.mkdir()
    for p in source.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    config = json.loads((d / "config.json").read_text()) | changes
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"remap": "used_codes.npy"}, "remap"),
        ({"norm_type": "foo"}, "norm_type"),
        ({"down_block_types": [D, "DownBlock2D", D]}, r"down_block_types\[1\]"),
        ({"up_block_types": [U, U, "AttnUpBlock2D"]}, r"up_block_types\[2\]"),
        ({"act_fn": "tanh"}, "act_fn"),
        ({"_class_name": "AutoencoderKL"}, "_class_name"),
        ({"in_channels": 4, "out_channels": 4}, "in_channels"),
        ({"out_channels": 1}, "out_channels"),
        ({"norm_type": "spatial", "vq_embed_dim": 8}, "vq_embed_dim"),
        ({"block_out_channels": [32, 32]}, "down_block_types"),  # two widths, three block types
        ({"block_out_channels": [32, 32], "down_block_types": [D, D], "up_block_types": [U, U]}, "block_out_channels"),  # f = 2
    ],
)
def test_unrepresentable_configs_are_refused_by_field(small_source: Path, tmp_path: Path, changes: dict[str, Any], field: str) -> None:
    source = patched(small_source, tmp_path, changes)
    with pytest.raises(UnsupportedModel, match=field):
        import_vqmodel(str(source), name="x", output=tmp_path / "repo")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_the_command_names_the_field_in_one_line(small_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="vqtok")
    commands.register(parser.add_subparsers(dest="command", required=True))
    source = patched(small_source, tmp_path, {"remap": "used_codes.npy"})
    args = parser.parse_args(["import", f"diffusers:{source}", "--name", "x", "--output", str(tmp_path / "repo")])
    with pytest.raises(commands.CLIError, match=r"^remap: 'used_codes\.npy': index remapping") as info:
        args.handler(args)
    assert info.value.code == 2 and "\n" not in str(info.value)
    for bad, message in (
        (["import", "huggingface:org/x", "--name", "x", "--output", "o"], "expected FORMAT:PATH_OR_HUB_ID"),
        (["import", f"diffusers:{source}", "--name", "../x", "--output", "o"], "--name '../x'"),
        (["import", "diffusers:no-such-dir", "--name", "x", "--output", "o"], "no such directory, and not a Hugging Face hub id"),
    ):
        with pytest.raises(commands.CLIError, match=message):
            a = parser.parse_args(bad)
            a.handler(a)


def test_pickled_weights_are_never_loaded(tmp_path: Path) -> None:
    d = tmp_path / "bin"
    VQModel(block_out_channels=(32, 32, 32), down_block_types=(D,) * 3, up_block_types=(U,) * 3, norm_num_groups=8).save_pretrained(
        d, safe_serialization=False
    )
    assert (d / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ImportFailed, match="safetensors weights only, never pickles"):
        import_vqmodel(str(d), name="x", output=tmp_path / "repo")


def test_an_existing_model_is_not_overwritten(small_source: Path, tmp_path: Path) -> None:
    (tmp_path / "repo" / "x").mkdir(parents=True)
    (tmp_path / "repo" / "x" / "config.json").write_text("{}")
    with pytest.raises(ImportFailed, match="exists; choose another --name or remove it"):
        import_vqmodel(str(small_source), name="x", output=tmp_path / "repo")


def test_float16_graphs_that_miss_the_gate_are_left_out_unless_asked_for(
    small_source: Path, tmp_path: Path, kodak_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16 is our default, not the user's request: where its graphs miss the export's gate (as a MoVQ-like
    model's did at 98.65 %: dense codes in D = 4) the model is imported with fp32 graphs, in one export, and
    its card says why. Asked for with fp16=True, the same miss refuses the import and writes nothing. (The
    fp16 bound is made unreachable here: the small model's real fp16 graphs pass it.)"""
    import models.export.driver as driver
    from models.export.parity import ParityBounds
    from models.importers.diffusers import ParityFailed

    monkeypatch.setitem(driver.PARITY, "fp16", ParityBounds(1.01, 40.0))
    real_export = driver.export_model
    calls: list[bool] = []

    def export_model(model_dir: Path, **kw: Any) -> dict[str, Any]:
        calls.append(kw["fp16"])
        return real_export(model_dir, **kw)

    monkeypatch.setattr(driver, "export_model", export_model)
    result = import_vqmodel(str(small_source), name="dense", output=tmp_path / "repo", resolution=32, parity_images=kodak_dir)
    assert calls == [True] and result.manifest["precisions"] == ["fp32"]
    assert result.manifest["fp16_left_out"].startswith("real_32x32: token agreement ")
    card = (result.model_dir / "MODEL_CARD.md").read_text()
    assert f"No float16 graphs: they missed the export's parity gate on real photos ({result.manifest['fp16_left_out']})." in card
    assert not (result.model_dir / "encoder.fp16.onnx").exists()
    assert open_exported(result.model_dir).info.precision == "fp32"

    calls.clear()
    with pytest.raises(ParityFailed, match="fp16 parity check failed"):
        import_vqmodel(str(small_source), name="asked", output=tmp_path / "repo", resolution=32, parity_images=kodak_dir, fp16=True)
    assert calls == [True] and not (tmp_path / "repo" / "asked").exists()


def test_without_diffusers_the_command_names_the_extra(small_source: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import argparse\nfrom models.importers import commands\n"
        "p = argparse.ArgumentParser(); commands.register(p.add_subparsers(dest='command'))\n"
        f"a = p.parse_args(['import', 'diffusers:{small_source}', '--name', 'x', '--output', {str(tmp_path)!r}])\n"
        "try:\n    a.handler(a)\nexcept commands.CLIError as exc:\n    print(exc.code, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2 importing from diffusers needs diffusers, which this install lacks: pip install 'vqtok[diffusers]'"


# --- pieces ---------------------------------------------------------------------------------------


def test_near_ties_are_counted_and_only_they() -> None:
    codebook = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    latents = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.1, 0.0]]).T.reshape(1, 2, 1, 3)  # (B, D, h, w)
    ours = torch.tensor([[[0, 1, 1]]])
    theirs = torch.tensor([[[1, 0, 0]]])  # 0 and 1 are equidistant from (1, 0); (0.1, 0) is not a tie
    assert near_ties(latents, codebook, ours, theirs) == 2 == count_ties(latents, codebook, ours, theirs)
    assert near_ties(latents, codebook, ours, ours) == 0


def test_taming_configs_read_and_refuse_like_every_config() -> None:
    cfg = TokenizerConfig(
        architecture="taming",
        block_out_channels=(32, 64, 64),
        latent_channels=4,
        latent_dim=4,
        encoder_attention=(False, False, True),
        decoder_attention=(True, False, False),
        linear_codebook=False,
        norm_groups=8,
        codebook_size=64,
        norm_type="spatial",
        source={"format": "diffusers", "id": "org/x"},
    )
    data = cfg.to_dict()
    assert "base_channels" not in data and "channel_mult" not in data and data["source"]["id"] == "org/x"
    assert TokenizerConfig.from_dict(json.loads(json.dumps(data))) == cfg and cfg.downsample == 4
    plain = TokenizerConfig().to_dict()  # a vqtok config names none of the new fields
    assert not {"architecture", "source", "block_out_channels", "norm_type", "act_fn"} & set(plain)
    for changes, message in (
        ({"norm_type": "foo"}, "norm_type must be one of"),
        ({"act_fn": "tanh"}, "act_fn must be one of"),
        ({"channel_mult": [1, 2]}, "channel_mult applies only to architecture='vqtok'"),
        ({"block_out_channels": [32, 48, 64]}, "not divisible by 32, the groups of norm_type='spatial'"),
        ({"latent_dim": 8}, "needs latent_dim == latent_channels"),
        ({"cosine": True}, "plain or SimVQ codebook"),
        ({"encoder_attention": [True]}, "one entry per level"),
        ({"encoder_attention": ["no", False, True]}, "expected true or false"),
        ({"architecture": "vqgan"}, "architecture must be one of"),
    ):
        with pytest.raises(ConfigError, match=message):
            cfg.replace(**changes)
    with pytest.raises(ConfigError, match="norm_type applies only to architecture='taming'"):
        TokenizerConfig(norm_type="spatial")


@pytest.fixture(autouse=True)
def _two_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))  # two cores, shared
    yield
    torch.set_num_threads(threads)


# --- the public families' configs -----------------------------------------------------------------
# config.json of each, as published on the Hugging Face hub (read, not downloaded, when this was written)
PUBLIC: dict[str, dict[str, Any]] = {
    "CompVis/ldm-celebahq-256 vqvae": {  # written by diffusers 0.1.2: no norm_num_groups, norm_type, vq_embed_dim
        "_class_name": "VQModel",
        "_diffusers_version": "0.1.2",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512],
        "down_block_types": [D, D, D],
        "in_channels": 3,
        "latent_channels": 3,
        "layers_per_block": 2,
        "num_vq_embeddings": 8192,
        "out_channels": 3,
        "sample_size": 256,
        "up_block_types": [U, U, U],
    },
    "kandinsky-community/kandinsky-2-2-decoder movq": {
        "_class_name": "VQModel",
        "_diffusers_version": "0.17.0.dev0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 256, 512],
        "down_block_types": [D, D, D, AD],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "norm_type": "spatial",
        "num_vq_embeddings": 16384,
        "out_channels": 3,
        "sample_size": 32,
        "scaling_factor": 0.18215,
        "up_block_types": [AU, U, U, U],
        "vq_embed_dim": 4,
    },
    "amused/amused-512 vqvae": {
        "_class_name": "VQModel",
        "_diffusers_version": "0.25.0.dev0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 256, 512, 768],
        "down_block_types": [D] * 5,
        "in_channels": 3,
        "latent_channels": 64,
        "layers_per_block": 2,
        "lookup_from_codebook": True,
        "mid_block_add_attention": False,
        "norm_num_groups": 32,
        "norm_type": "group",
        "num_vq_embeddings": 8192,
        "out_channels": 3,
        "sample_size": 32,
        "scaling_factor": 0.18215,
        "up_block_types": [U] * 5,
        "vq_embed_dim": None,
        "force_upcast": True,
    },
    "xvjiarui/taming-vq-f16-n1024": {
        "_class_name": "VQModel",
        "_diffusers_version": "0.14.0.dev0",
        "act_fn": "silu",
        "block_out_channels": [128, 128, 256, 256, 512],
        "down_block_types": [D, D, D, D, AD],
        "in_channels": 3,
        "latent_channels": 256,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "num_vq_embeddings": 1024,
        "out_channels": 3,
        "sample_size": 256,
        "scaling_factor": 0.18215,
        "up_block_types": [AU, U, U, U, U],
        "vq_embed_dim": None,
    },
    "nielsr/absorbing-diffusion-churches vae": {
        "_class_name": "VQModel",
        "_diffusers_version": "0.4.0.dev0",
        "act_fn": "swish",
        "block_out_channels": [128, 128, 256, 256, 512],
        "down_block_types": [D, D, D, D, AD],
        "final_decoder_activation": False,
        "final_encoder_activation": False,
        "in_channels": 3,
        "latent_channels": 256,
        "layers_per_block": 2,
        "num_vq_embeddings": 1024,
        "out_channels": 3,
        "sample_size": 32,
        "up_block_types": [AU, U, U, U, U],
    },
}
# (downsample, codebook size, code dimension, decoder norms) each should import as
EXPECTED = {
    "CompVis/ldm-celebahq-256 vqvae": (4, 8192, 3, "group"),
    "kandinsky-community/kandinsky-2-2-decoder movq": (8, 16384, 4, "spatial"),
    "amused/amused-512 vqvae": (16, 8192, 64, "group"),
    "xvjiarui/taming-vq-f16-n1024": (16, 1024, 256, "group"),
    "nielsr/absorbing-diffusion-churches vae": (16, 1024, 256, "group"),
}


@pytest.mark.parametrize("family", list(PUBLIC))
def test_public_family_configs_build_diffusers_network(family: str) -> None:
    """Each published config maps to a taming config whose network has exactly diffusers' parameters
    (names and shapes; built on the meta device: no memory, no weights)."""
    from models.importers.diffusers import ignored_fields, taming_config, vqmodel_defaults

    raw = PUBLIC[family]
    defaults = vqmodel_defaults()
    config = taming_config(raw, defaults, resolution=256, source={})
    assert (config.downsample, config.codebook_size, config.latent_dim, config.norm_type) == EXPECTED[family]
    extra = ["final_decoder_activation", "final_encoder_activation"] if "absorbing" in family else []
    assert ignored_fields(raw, defaults) == extra  # diffusers drops them too: reported in `source`, not refused
    init = {k: v for k, v in raw.items() if not k.startswith("_") and k in defaults}
    with torch.device("meta"):
        theirs = {k: v.shape for k, v in vqtok_state_dict(VQModel(**init).state_dict()).items()}
        ours = {k: v.shape for k, v in Tokenizer(config).state_dict().items()}
    assert ours == theirs


def test_a_resolution_the_network_cannot_tile_is_the_callers_error() -> None:
    """--resolution that is not a multiple of f names the resolution (ImportFailed), not a field of the source."""
    from models.importers.diffusers import ImportFailed, UnsupportedModel, taming_config, vqmodel_defaults

    raw = next(iter(PUBLIC.values()))
    f = 2 ** (len(raw["block_out_channels"]) - 1)
    for bad in (f + f // 2, f // 2):
        with pytest.raises(ImportFailed, match=f"resolution {bad}: must be a positive multiple") as info:
            taming_config(raw, vqmodel_defaults(), resolution=bad, source={})
        assert not isinstance(info.value, UnsupportedModel)
