"""diffusers' `VQModel` -> a vqtok model directory, with parity checked against diffusers on the way.

`import_vqmodel("amused/amused-256", subfolder="vqvae", name=..., output=...)` reads the VQModel's
config.json, maps it to a `TokenizerConfig` (architecture "taming", `models/taming.py`), loads the
weights through diffusers (a hub id through huggingface_hub's cache; HF_HUB_OFFLINE is honoured),
renames them into the Tokenizer, checks that the Tokenizer reproduces diffusers' ids and decodes
(`IMPORT_PARITY`), writes config.json (with `source`), model.safetensors and model cards, and runs the
ordinary export (ONNX graphs, parity.npz, manifest). The directory appears under its name only once
all of that has passed; nothing downstream needs diffusers or tells it from a vqtok-trained model.

Anything vqtok cannot represent exactly is refused with the config field named (`UnsupportedModel`),
never imported as a different model. Accepted as they are, because they change neither ids nor
decodes: `lookup_from_codebook` (how diffusers' own `decode` takes ids: vqtok's decode always does),
`scaling_factor` (diffusion latents only), `sample_size` (diffusers stores 32 for aMUSEd and
Kandinsky, so `resolution` is the importer's argument instead) and the quantizer's `legacy` loss.

torch, diffusers and huggingface_hub are imported when a function needs them, so this module imports
without them and a missing one is one clear line naming the `vqtok[diffusers]` extra.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import TAMING_ACTIVATIONS, ConfigError, TokenizerConfig
from ..core.artefacts import hub_id

if TYPE_CHECKING:
    import torch
    from diffusers.models.autoencoders.vq_model import VQModel

    from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

EXTRA = "pip install 'vqtok[diffusers]'"
DEFAULT_RESOLUTION = 256
# diffusers' block types vqtok builds, and whether each has self-attention after its residual blocks
DOWN_BLOCKS = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
UP_BLOCKS = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
# config.json keys diffusers' VQModel does not take but whose meaning vqtok cannot reproduce: taming's
# index remapping (ids would name other codes)
REFUSED_KEYS = {
    "remap": "index remapping (taming's `remap` .npy) changes which code an id names; vqtok ids are codebook rows",
    "unknown_index": "index remapping (taming's `remap`) changes which code an id names; vqtok ids are codebook rows",
}
PSNR_CAP_DB = 100.0


class ImportFailed(RuntimeError):
    """The source could not be read, loaded, or reproduced (the message says which and why)."""


class UnsupportedModel(ImportFailed):
    """A source model vqtok cannot represent exactly; the message names the config field."""


class MissingExtra(ImportFailed):
    """diffusers, huggingface_hub or torch is missing: the `vqtok[diffusers]` extra."""


class ParityFailed(ImportFailed):
    """The Tokenizer does not reproduce diffusers, or the export (its ONNX graphs) does not reproduce the Tokenizer."""


@dataclass(frozen=True)
class ImportBounds:
    min_token_agreement: float  # ids equal to diffusers', near-ties counted as equal
    min_decode_psnr_db: float  # vqtok's decode of the ids against diffusers' decode of the same ids


IMPORT_PARITY = ImportBounds(0.999, 45.0)


@dataclass
class ImportResult:
    model_dir: Path
    config: TokenizerConfig
    parity: dict[str, Any]  # the import gate's figures (`compare_with_diffusers`)
    manifest: dict[str, Any]  # the export's manifest (ONNX parity figures under "parity")
    seconds: dict[str, float] = field(default_factory=dict)  # load, check, write, export, total


# --- reading the source --------------------------------------------------------------------------


def _diffusers() -> Any:
    """The diffusers module, or MissingExtra naming the extra."""
    try:
        import diffusers
        import huggingface_hub  # noqa: F401
        import torch  # noqa: F401
    except ModuleNotFoundError as exc:
        raise MissingExtra(f"importing from diffusers needs {exc.name}, which this install lacks: {EXTRA}") from exc
    return diffusers


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' loading chatter (unused config keys, deprecations) is the importer's to report, once."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlogging.set_verbosity(level)


@dataclass(frozen=True)
class SourceRef:
    """Where the VQModel lives: a local directory, or a hub repository (and the revision asked for)."""

    location: str  # a local directory (absolute) or a hub id ORG/NAME
    local: bool
    subfolder: str | None = None
    revision: str | None = None


def source_ref(path_or_id: str, subfolder: str | None = None, revision: str | None = None) -> SourceRef:
    """A local directory if one exists at `path_or_id`, else a hub id (ORG/NAME or ORG/NAME@REVISION)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if revision:
            raise ImportFailed(f"--revision {revision}: {path_or_id} is a local directory, not a hub repository")
        return SourceRef(str(path.resolve()), True, subfolder or None)
    parsed = hub_id(path_or_id)
    if parsed is None:
        raise ImportFailed(f"{path_or_id}: no such directory, and not a Hugging Face hub id (ORG/NAME)")
    repo, at = parsed
    if at and revision and at != revision:
        raise ImportFailed(f"{path_or_id}: names revision {at} and --revision {revision}; give one")
    return SourceRef(repo, False, subfolder or None, revision or at)


def load_source_config(ref: SourceRef) -> tuple[dict[str, Any], str | None]:
    """The VQModel's config.json as written (not as diffusers fills it in), and the hub commit it came from."""
    diffusers = _diffusers()
    try:
        with _quiet_diffusers():
            raw, commit = diffusers.VQModel.load_config(
                ref.location, subfolder=ref.subfolder, revision=ref.revision, return_commit_hash=True
            )
    except OSError as exc:
        raise ImportFailed(f"{_describe(ref)}: cannot read its config.json: {_first_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise ImportFailed(f"{_describe(ref)}: config.json does not hold a JSON object")
    return raw, commit


def vqmodel_defaults() -> dict[str, Any]:
    """diffusers' VQModel.__init__ defaults, for keys an older config.json leaves out (its diffusers filled them in)."""
    diffusers = _diffusers()
    params = inspect.signature(diffusers.VQModel.__init__).parameters
    return {name: p.default for name, p in params.items() if name != "self" and p.default is not inspect.Parameter.empty}


# --- config: diffusers' VQModel -> TokenizerConfig ------------------------------------------------


def taming_config(raw: Mapping[str, Any], defaults: Mapping[str, Any], *, resolution: int, source: dict[str, Any]) -> TokenizerConfig:
    """Map a VQModel config.json (`raw`, with `defaults` for missing keys) to a TokenizerConfig, or
    UnsupportedModel naming the first field vqtok cannot reproduce exactly."""
    class_name = raw.get("_class_name", "VQModel")
    if class_name != "VQModel":
        raise UnsupportedModel(f"_class_name: {class_name!r}; vqtok imports diffusers' VQModel only")
    for key, why in REFUSED_KEYS.items():
        if raw.get(key) is not None:
            raise UnsupportedModel(f"{key}: {raw[key]!r}: {why}")
    c = {**defaults, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    widths = [int(w) for w in c["block_out_channels"]]
    f = 2 ** (len(widths) - 1)
    if resolution < f or resolution % f:
        # the caller's choice, not the source's: ImportFailed, not UnsupportedModel
        raise ImportFailed(f"resolution {resolution}: must be a positive multiple of this model's downsample factor {f}")
    down = _block_attention("down_block_types", c["down_block_types"], DOWN_BLOCKS, len(widths))
    up = _block_attention("up_block_types", c["up_block_types"], UP_BLOCKS, len(widths))
    norm_type = c["norm_type"]
    if norm_type not in ("group", "spatial"):
        raise UnsupportedModel(f"norm_type: {norm_type!r}; vqtok builds 'group' and 'spatial' (MoVQ) decoders")
    act_fn = str(c["act_fn"]).lower()  # diffusers' get_activation lower-cases it
    if act_fn not in TAMING_ACTIVATIONS:
        raise UnsupportedModel(f"act_fn: {c['act_fn']!r}; vqtok builds {', '.join(TAMING_ACTIVATIONS)}")
    if c["in_channels"] != 3:
        raise UnsupportedModel(f"in_channels: {c['in_channels']}; vqtok tokenizes RGB images (3 channels)")
    if c["out_channels"] != c["in_channels"]:
        raise UnsupportedModel(f"out_channels: {c['out_channels']}; vqtok decodes to the input's {c['in_channels']} channels")
    latent_channels = int(c["latent_channels"])
    vq_embed_dim = int(c["vq_embed_dim"]) if c.get("vq_embed_dim") is not None else latent_channels
    if norm_type == "spatial" and vq_embed_dim != latent_channels:
        # diffusers builds its SpatialNorms for latent_channels and feeds them the codes: it cannot run either
        raise UnsupportedModel(
            f"vq_embed_dim: {vq_embed_dim} with norm_type 'spatial' needs vq_embed_dim == latent_channels ({latent_channels})"
        )
    try:
        return TokenizerConfig(
            architecture="taming",
            quantizer="vq",
            codebook_size=int(c["num_vq_embeddings"]),
            latent_dim=vq_embed_dim,
            gradient="ste",  # diffusers' VectorQuantizer: straight-through
            linear_codebook=False,
            cosine=False,
            block_out_channels=tuple(widths),
            num_res_blocks=int(c["layers_per_block"]),
            attention=bool(c["mid_block_add_attention"]),
            norm_groups=int(c["norm_num_groups"]),
            latent_channels=latent_channels,
            encoder_attention=down,
            decoder_attention=up,
            norm_type=norm_type,
            act_fn=act_fn,
            resolution=resolution,
            in_channels=3,
            source=source,
        )
    except ConfigError as exc:
        names = "block_out_channels, layers_per_block = num_res_blocks, norm_num_groups = norm_groups, num_vq_embeddings = codebook_size"
        raise UnsupportedModel(f"{exc} (vqtok's names for diffusers' fields: {names})") from exc


def _block_attention(key: str, types: Any, known: Mapping[str, bool], levels: int) -> tuple[bool, ...]:
    if not isinstance(types, list | tuple) or len(types) != levels:
        raise UnsupportedModel(f"{key}: {types!r}; expected one block type per block_out_channels entry ({levels})")
    out = []
    for i, t in enumerate(types):
        name = str(t).removeprefix("UNetRes")  # diffusers' get_down_block / get_up_block strip it too
        if name not in known:
            raise UnsupportedModel(f"{key}[{i}]: {t!r}; vqtok imports {' and '.join(known)}")
        out.append(known[name])
    return tuple(out)


def ignored_fields(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """config.json keys diffusers' VQModel ignores (it logs and drops them): reported, not refused."""
    return sorted(k for k in raw if not k.startswith("_") and k not in defaults and k not in REFUSED_KEYS)


# --- weights ---------------------------------------------------------------------------------------


def load_vqmodel(ref: SourceRef) -> VQModel:
    """diffusers' VQModel in float32 on the CPU, from safetensors only (no pickle is ever loaded)."""
    diffusers = _diffusers()
    import torch

    try:
        with _quiet_diffusers():
            vq = diffusers.VQModel.from_pretrained(
                ref.location, subfolder=ref.subfolder, revision=ref.revision, torch_dtype=torch.float32, use_safetensors=True
            )
    except (OSError, ValueError) as exc:
        hint = ""
        if "safetensors" in str(exc).lower():
            hint = " (vqtok loads safetensors weights only, never pickles; on the hub a refs/pr/N revision often holds a conversion)"
        raise ImportFailed(f"{_describe(ref)}: diffusers could not load the VQModel: {_first_line(exc)}{hint}") from exc
    quantizer = type(vq.quantize)
    if quantizer is not diffusers.models.autoencoders.vae.VectorQuantizer:
        raise UnsupportedModel(f"quantize: {quantizer.__name__}; vqtok imports diffusers' VectorQuantizer (a plain L2 codebook) only")
    if getattr(vq.quantize, "remap", None) is not None:
        raise UnsupportedModel("remap: the quantizer remaps its indices; vqtok ids are codebook rows")
    return vq.eval()


def vqtok_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' VQModel keys -> the Tokenizer's: quant_conv into the encoder, post_quant_conv into the
    decoder, the codebook into the quantizer; every other key is already the same."""
    out = {}
    for key, value in state.items():
        if key.startswith(("encoder.", "decoder.")):
            new = key
        elif key.startswith("quant_conv."):
            new = "encoder." + key
        elif key.startswith("post_quant_conv."):
            new = "decoder." + key
        elif key == "quantize.embedding.weight":
            new = "quantizer.embedding"
        else:
            raise UnsupportedModel(f"weights: {key!r} is no part of the taming VQModel vqtok builds")
        out[new] = value.detach().float().contiguous()
    return out


def tokenizer_from_vqmodel(vq: VQModel, config: TokenizerConfig) -> Tokenizer:
    from ..tokenizer import Tokenizer

    tok = Tokenizer(config)
    try:
        tok.load_state_dict(vqtok_state_dict(vq.state_dict()), strict=True)
    except RuntimeError as exc:
        raise ImportFailed(f"the VQModel's weights do not fit the network its config describes: {exc}") from exc
    return tok.eval()


# --- parity with diffusers -------------------------------------------------------------------------


def diffusers_ids(vq: VQModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' own path from images to ids: `VQModel.encode(x).latents` -> `VQModel.quantize`.
    Returns (latents (B, D, h, w), ids (B, h, w))."""
    latents = vq.encode(x).latents
    _, _, (_, _, ids) = vq.quantize(latents)
    b, _, h, w = latents.shape
    return latents, ids.reshape(b, h, w)


def diffusers_decode_ids(vq: VQModel, ids: torch.Tensor) -> torch.Tensor:
    """diffusers' own decode of token ids: `VQModel.decode(ids, force_not_quantize=True, shape=...)`
    where the model looks its codes up itself (lookup_from_codebook), else of the codebook rows."""
    b, h, w = ids.shape
    shape = (b, h, w, vq.quantize.vq_embed_dim)
    if vq.config["lookup_from_codebook"]:
        return vq.decode(ids.reshape(-1), force_not_quantize=True, shape=shape).sample
    codes = vq.quantize.get_codebook_entry(ids.reshape(-1), shape)  # type: ignore[arg-type]  # a LongTensor
    return vq.decode(codes, force_not_quantize=True).sample


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two float images in [-1, 1] (clamped; peak-to-peak 2), capped at PSNR_CAP_DB."""
    mse = float((a.clamp(-1, 1).double() - b.clamp(-1, 1).double()).pow(2).mean())
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(4.0 / mse))


def compare_with_diffusers(vq: VQModel, tok: Tokenizer, images: np.ndarray) -> dict[str, Any]:
    """The Tokenizer against diffusers on uint8 images (B, H, W, 3): ids (agreement, mismatches, near-ties)
    and the decodes of the same ids (`decode_psnr_db`)."""
    import torch

    from ..export.graphs import images_to_input
    from ..quantizers import VectorQuantizer
    from ..quantizers.functional import near_ties

    if not isinstance(tok.quantizer, VectorQuantizer):
        raise ImportFailed("a taming tokenizer quantizes with a codebook (VectorQuantizer)")
    x = images_to_input(torch.from_numpy(np.ascontiguousarray(images)))
    with torch.no_grad():
        latents, reference = diffusers_ids(vq, x)
        ids = tok.encode(x)
        mismatches = int((ids != reference).sum())
        ties = near_ties(latents, tok.quantizer.codebook().detach(), ids, reference)
        ours = tok.decode(ids)
        same_ids = diffusers_decode_ids(vq, ids)
    total = ids.numel()
    figures = {
        "images": int(images.shape[0]),
        "size": list(images.shape[1:3]),
        "tokens": total,
        "token_agreement": 1 - mismatches / total,
        "mismatches": mismatches,
        "near_ties": ties,
        "agreement_with_ties": 1 - (mismatches - ties) / total,
        "decode_psnr_db": psnr(ours, same_ids),
    }
    return figures


def parity_failures(figures: Mapping[str, Any], bounds: ImportBounds = IMPORT_PARITY) -> list[str]:
    bad = []
    if figures["agreement_with_ties"] < bounds.min_token_agreement:
        bad.append(
            f"ids: {figures['token_agreement']:.4%} equal to diffusers' ({figures['mismatches']} differ, "
            f"{figures['near_ties']} of them near-ties) < {bounds.min_token_agreement:.1%}"
        )
    if figures["decode_psnr_db"] < bounds.min_decode_psnr_db:
        bad.append(
            f"decodes: {figures['decode_psnr_db']:.1f} dB from diffusers' decode of the same ids < {bounds.min_decode_psnr_db:.0f} dB"
        )
    return bad


def probe_images(resolution: int, parity_images: str | Path | None, count: int = 2) -> np.ndarray:
    """uint8 (B, r, r, 3): real photos where the export would find them (`--parity-images`,
    $VQTOK_PARITY_IMAGES, ../shared/data/kodak), else seeded random images."""
    from ..export.parity import find_parity_images, real_parity_images

    real = find_parity_images(parity_images)
    if real:
        return real_parity_images(real, (resolution, resolution), count)
    return np.random.default_rng(0).integers(0, 256, size=(count, resolution, resolution, 3), dtype=np.uint8)


# --- provenance and cards --------------------------------------------------------------------------


def source_license(ref: SourceRef, commit: str | None) -> str | None:
    """The licence the source's model card states (its YAML front matter), where one is at hand:
    the local directory's README.md, or the hub repository's (through the cache; offline if set)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.repocard import metadata_load

    cards = []
    if ref.local:
        root = Path(ref.location)
        cards = [root / ref.subfolder / "README.md"] if ref.subfolder else []
        cards.append(root / "README.md")
    else:
        try:
            cards = [Path(hf_hub_download(ref.location, "README.md", revision=commit or ref.revision))]
        except Exception as exc:  # not cached offline, no card, no network: the licence stays unknown
            log.info("no model card for %s: %s", ref.location, _first_line(exc))
    for card in cards:
        if card.is_file():
            try:
                meta = metadata_load(card) or {}
            except Exception:  # a card with malformed front matter states no licence we can read
                continue
            if meta.get("license"):
                return str(meta["license"])
    return None


def source_record(ref: SourceRef, raw: Mapping[str, Any], commit: str | None, license: str | None, ignored: list[str]) -> dict[str, Any]:
    """The config's `source` field: where the model came from and what vqtok read of it."""
    diffusers = _diffusers()
    record: dict[str, Any] = {"format": "diffusers", "class": "VQModel"}
    record["path" if ref.local else "id"] = ref.location
    if ref.subfolder:
        record["subfolder"] = ref.subfolder
    if ref.revision:
        record["revision"] = ref.revision
    if commit:
        record["commit"] = commit
    if license:
        record["license"] = license
    if raw.get("_diffusers_version"):
        record["diffusers_version"] = str(raw["_diffusers_version"])  # the diffusers that wrote the config
    record["imported_with"] = f"diffusers {diffusers.__version__}"
    for key in ("lookup_from_codebook", "force_upcast", "scaling_factor"):
        if key in raw:
            record[key] = raw[key]
    if ignored:
        record["ignored_fields"] = ignored
    return record


def hub_card(name: str, config: TokenizerConfig) -> str:
    """README.md: the Hugging Face hub's card (front matter: library, licence, base model), short."""
    src = config.source
    tags = ["vqtok", "image-tokenizer", "vector-quantization", "vqgan", "diffusers-import"]
    if config.norm_type == "spatial":
        tags.append("movq")
    front = ["---", "library_name: vqtok", f"license: {src.get('license', 'other')}", "pipeline_tag: image-feature-extraction"]
    if "id" in src:
        front.append(f"base_model: {src['id']}")
    front += ["tags:", *(f"- {t}" for t in tags), "---"]
    f, k = config.downsample, config.codebook_size
    origin = src.get("id") or Path(src.get("path", "")).name
    return "\n".join(front) + (
        f"\n\n# {name}\n\n"
        f"{origin}{'/' + src['subfolder'] if src.get('subfolder') else ''}, a diffusers `VQModel`, imported as a vqtok "
        f"image tokenizer (`vqtok import`): K = {k:,} codes, f = {f} (an H×W image is (H/{f})×(W/{f}) tokens). "
        "Details, licence and parity with diffusers: MODEL_CARD.md.\n\n"
        "```python\nimport vqtok\n\n"
        f'tok = vqtok.Tokenizer.from_pretrained("ORG/{name}")  # or the local directory\n'
        f"ids = tok.encode(x)  # x: float (B, 3, H, W) in [-1, 1] -> int64 (B, H/{f}, W/{f})\n"
        "y = tok.decode(ids)  # -> float (B, 3, H, W) in [-1, 1]\n```\n"
    )


def model_card(name: str, config: TokenizerConfig, parity: Mapping[str, Any], fp16_note: str) -> str:
    """MODEL_CARD.md: what was imported, from where, how it maps, and the parity figures."""
    src = config.source
    f, k, d = config.downsample, config.codebook_size, config.latent_dim
    attn = lambda flags: ", ".join("yes" if a else "no" for a in flags)  # noqa: E731
    rows = [
        ("source", ", ".join(f"{key} {value}" for key, value in src.items())),
        ("licence", src.get("license", "not stated by the source: check it before use")),
        (
            "architecture",
            f"taming VQGAN (models/taming.py): widths {list(config.block_out_channels)}, {config.num_res_blocks} residual block(s) per level "
            f"({config.num_res_blocks + 1} in the decoder), GroupNorm({config.norm_groups}), {config.act_fn}, "
            f"attention by level: encoder [{attn(config.encoder_attention)}], decoder [{attn(config.decoder_attention)}], "
            f"mid blocks {'yes' if config.attention else 'no'}; decoder norms {config.norm_type}",
        ),
        (
            "quantizer",
            f"plain codebook, L2 nearest code (as diffusers' VectorQuantizer): K = {k:,}, D = {d}, latent channels {config.latent_channels}",
        ),
        ("rate", f"f = {f}: {math.log2(k):.3g} bits per token, {math.log2(k) / f**2:.3g} bits per pixel"),
        (
            "resolution",
            f"{config.resolution}×{config.resolution} for the service's crop mode and the export's parity sets; any multiple of {f} works",
        ),
    ]
    table = "\n".join(["| | |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)])
    return (
        f"# {name}\n\nImported from diffusers by `vqtok import {spec_from_source(src)} --name {name}`.\n\n{table}\n\n"
        "## Parity with diffusers (CPU, float32, at import)\n\n"
        f"On {parity['images']} images of {parity['size'][0]}×{parity['size'][1]}: ids {parity['token_agreement']:.4%} equal to "
        f"`VQModel.encode` → `VQModel.quantize` ({parity['mismatches']} of {parity['tokens']} differ, {parity['near_ties']} of them "
        "near-ties: two codes a float32 rounding of the latent or of the search could swap, the rule of "
        f"`models.quantizers.functional.near_tie_mask`); decodes {parity['decode_psnr_db']:.1f} dB from "
        "`VQModel.decode` of the same ids. The ONNX graphs' parity with this torch model is in manifest.json.\n\n"
        "## Notes\n\n"
        f"- {fp16_note}\n"
        "- Fine-tuning with vqtok trains with straight-through gradients and β = 0.25 on the commitment term; diffusers' "
        "VectorQuantizer (legacy=True) puts β on the codebook term instead. Encoding and decoding are unaffected.\n"
        "- `scaling_factor` scales latents for diffusion models and plays no part in tokens.\n"
    )


def spec_from_source(src: Mapping[str, Any]) -> str:
    text = f"diffusers:{src.get('id') or src.get('path')}"
    if src.get("subfolder"):
        text += f" --subfolder {src['subfolder']}"
    if src.get("revision"):
        text += f" --revision {src['revision']}"
    return text


# --- the importer ----------------------------------------------------------------------------------


def import_vqmodel(
    path_or_id: str,
    *,
    name: str,
    output: str | Path,
    subfolder: str | None = None,
    revision: str | None = None,
    resolution: int | None = None,
    fp16: bool | None = None,
    parity_images: str | Path | None = None,
    progress: bool | None = None,
) -> ImportResult:
    """Import diffusers' VQModel at `path_or_id` (a local directory or a hub id) into `output/name`.

    `resolution` (default 256): the native image size, a multiple of the downsample factor.
    `fp16` (None: unless the source sets `force_upcast`): also export float16 graphs.
    Raises UnsupportedModel (a field vqtok cannot represent), ImportFailed (unreadable source, weights
    that do not fit, parity with diffusers not met), the export's ExportError (ONNX parity not met);
    nothing is left under `output/name` unless everything passed.
    """
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    target = Path(output) / name
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ImportFailed(f"{target} exists; choose another --name or remove it")
    ref = source_ref(path_or_id, subfolder, revision)
    raw, commit = load_source_config(ref)
    defaults = vqmodel_defaults()
    ignored = ignored_fields(raw, defaults)
    if ignored:
        log.warning("%s: config keys diffusers' VQModel ignores, so vqtok does too: %s", _describe(ref), ", ".join(ignored))
    res = resolution if resolution is not None else DEFAULT_RESOLUTION
    # mapped (and refused) before any weights are read
    try:
        config = taming_config(raw, defaults, resolution=res, source={})
    except (TypeError, ValueError, KeyError) as exc:  # a field of the wrong type: a list where a number belongs
        raise UnsupportedModel(f"config.json: a field vqtok cannot read: {exc!r}") from exc
    config = config.replace(source=source_record(ref, raw, commit, source_license(ref, commit), ignored))

    vq = load_vqmodel(ref)
    tok = tokenizer_from_vqmodel(vq, config)
    seconds["load"] = time.perf_counter() - start

    t = time.perf_counter()
    figures = compare_with_diffusers(vq, tok, probe_images(config.resolution, parity_images))
    seconds["check"] = time.perf_counter() - t
    bad = parity_failures(figures)
    if bad:
        raise ParityFailed(f"{_describe(ref)}: vqtok does not reproduce diffusers; nothing was written:\n  " + "\n  ".join(bad))
    del vq

    force_upcast = bool(raw.get("force_upcast", False))
    half = fp16 if fp16 is not None else not force_upcast
    if half:
        fp16_note = "float16 ONNX graphs: networks in float16, code search in float32, gated like every vqtok export."
    elif force_upcast and fp16 is None:
        fp16_note = "No float16 graphs: the source sets force_upcast (diffusers runs it in float32 in float16 pipelines)."
    else:
        fp16_note = "No float16 graphs (not asked for)."

    Path(output).mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=output))
    staging = workspace / name  # the model's own name while it is built: the export names it so
    try:
        t = time.perf_counter()
        tok.save_pretrained(staging, model_card=False)
        (staging / "README.md").write_text(hub_card(name, config), encoding="utf-8")
        (staging / "MODEL_CARD.md").write_text(model_card(name, config, figures, fp16_note), encoding="utf-8")
        seconds["write"] = time.perf_counter() - t
        t = time.perf_counter()
        from ..export.driver import export_model
        from ..export.parity import ExportError

        try:
            # float16 as our default (not the user's request) may be left out: a model whose codes are dense in
            # a low code dimension (MoVQ: 16,384 codes in D = 4) can miss the fp16 gate on real photos; it is
            # still served exactly, from the fp32 graphs, and the card says why there are no others.
            manifest = export_model(staging, fp16=half, fp16_optional=fp16 is None, parity_images=parity_images, progress=progress)
        except ExportError as exc:
            raise ParityFailed(f"the export of {name} failed; nothing was written: {exc}") from exc
        if manifest.get("fp16_left_out"):
            fp16_note = f"No float16 graphs: they missed the export's parity gate on real photos ({manifest['fp16_left_out']})."
            (staging / "MODEL_CARD.md").write_text(model_card(name, config, figures, fp16_note), encoding="utf-8")
        seconds["export"] = time.perf_counter() - t
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(staging, target)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    seconds["total"] = time.perf_counter() - start
    return ImportResult(target, config, figures, manifest, seconds)


def _describe(ref: SourceRef) -> str:
    return ref.location + (f" (subfolder {ref.subfolder})" if ref.subfolder else "") + (f" at {ref.revision}" if ref.revision else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
