"""The user-facing Tokenizer: images <-> token ids, plus the training forward and checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import ConfigError, TokenizerConfig
from .core.artefacts import resolve_model_dir
from .core.errors import ModelNotFound
from .core.fileio import atomic_path
from .networks import Decoder, Encoder
from .quantizers import FSQ, QuantizerOutput, VectorQuantizer
from .taming import TamingDecoder, TamingEncoder, taming_networks

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HUB_CARD_FILE = "README.md"  # the model card the Hugging Face hub shows (its front matter is the metadata)


def unit_from_uint8(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 in [−1, 1]: v / 127.5 − 1, the value rule every image
    crosses into a tokenizer by (training, evaluation and the exported graphs alike)."""
    return images.to(torch.float32) / 127.5 - 1.0


def uint8_from_unit(y: Tensor) -> Tensor:
    """float (B, 3, H, W), nominally [−1, 1] -> uint8: round((y + 1)·127.5), clamped (what a saved image holds)."""
    return ((y.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class CheckpointError(RuntimeError):
    """A model directory that cannot be loaded (missing, corrupt or mismatched files)."""


@dataclass
class TokenizerOutput:
    reconstruction: Tensor  # (B, 3, H, W), not clamped (losses see the raw output)
    quantizer: QuantizerOutput

    @property
    def indices(self) -> Tensor:
        return self.quantizer.indices

    @property
    def loss(self) -> Tensor:
        """The quantizer's loss; the trainer adds reconstruction and other terms."""
        return self.quantizer.loss


def build_quantizer(config: TokenizerConfig) -> VectorQuantizer | FSQ:
    if config.quantizer == "fsq":
        return FSQ(config.fsq_levels)
    return VectorQuantizer(
        dim=config.latent_dim,
        codebook_size=config.codebook_size,
        gradient=config.gradient,
        linear_codebook=config.linear_codebook,
        cosine=config.cosine,
        beta=config.beta,
    )


class Tokenizer(nn.Module):
    """Convolutional encoder -> quantizer -> decoder.

    Images are float (B, 3, H, W) in [-1, 1] with H, W multiples of ``downsample``; token ids are
    int64 (B, H/f, W/f) in [0, codebook_size).
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder: Encoder | TamingEncoder
        self.decoder: Decoder | TamingDecoder
        if config.architecture == "taming":
            # the plain-codebook quantizer of the taming family; the decoder takes the codes (spatial
            # norms condition on them), so encode/decode and the export graphs are the same as below
            self.encoder, self.decoder = taming_networks(config)
            self.quantizer: VectorQuantizer | FSQ = build_quantizer(config)
            return
        net = dict(
            base_channels=config.base_channels,
            channel_mult=config.channel_mult,
            num_res_blocks=config.num_res_blocks,
            latent_dim=config.latent_dim,
            attention=config.attention,
            groups=config.norm_groups,
        )
        self.encoder = Encoder(in_channels=config.in_channels, **net)  # type: ignore[arg-type]
        self.quantizer = build_quantizer(config)
        net["base_channels"] = config.decoder_base_channels
        self.decoder = Decoder(out_channels=config.in_channels, **net)  # type: ignore[arg-type]

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def check_images(self, x: Tensor) -> None:
        f = self.downsample
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != self.config.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [-1, 1], got dtype {x.dtype}")
        h, w = x.shape[-2:]
        if h == 0 or w == 0 or h % f or w % f:
            raise ValueError(f"image height and width must be positive multiples of {f}, got {h}x{w}")

    def check_indices(self, indices: Tensor) -> None:
        if not isinstance(indices, Tensor) or indices.ndim != 3 or indices.is_floating_point():
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"expected integer token ids (B, h, w), got {shape}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.codebook_size})")

    def quantize(self, x: Tensor) -> QuantizerOutput:
        self.check_images(x)
        return self.quantizer(self.encoder(x))

    def forward(self, x: Tensor) -> TokenizerOutput:
        """Training forward: (B, 3, H, W) -> reconstruction, indices, quantizer loss, usage counts."""
        q = self.quantize(x)
        return TokenizerOutput(reconstruction=self.decoder(q.quantized), quantizer=q)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) float in [-1, 1] -> int64 token ids (B, H/f, W/f)."""
        return self.quantize(x).indices

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """int token ids (B, h, w) -> float images (B, 3, h·f, w·f) in [-1, 1]."""
        self.check_indices(indices)
        codes = self.quantizer.indices_to_codes(indices.to(self.device))
        return self.decoder(codes).clamp(-1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- checkpoints: config.json + model.safetensors, never pickle ---

    def save_pretrained(self, directory: str | Path, *, model_card: bool = True, license: str = "other") -> Path:
        """Write `config.json` and `model.safetensors` to `directory`; with `model_card=True`, also a
        `README.md` model card (unless the directory has one) whose front matter the Hugging Face hub
        reads (library_name vqtok, pipeline tag, tags, `license`), with the codebook size and downsample
        factor: the directory is then ready for `huggingface-cli upload ORG/NAME DIRECTORY` and
        `Tokenizer.from_pretrained("ORG/NAME")`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        _atomic_write(directory / CONFIG_FILE, self.config.save)
        card = directory / HUB_CARD_FILE
        if model_card and not card.exists():
            params = sum(p.numel() for p in self.parameters())
            text = _hub_card(self.config, directory.resolve().name or "vqtok-tokenizer", params, license)
            _atomic_write(card, lambda p: p.write_text(text, encoding="utf-8"))
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, map_location: str | torch.device = "cpu") -> Tokenizer:
        """Load a model directory (config.json + model.safetensors), named as everywhere in vqtok
        (`models.core.artefacts.resolve_model_dir`): a path, the NAME of a shipped model (from any
        working directory), or ORG/NAME[@REVISION] on the Hugging Face hub (needs huggingface_hub).
        Raises CheckpointError when the name names no directory (its cause: the rule's ModelNotFound)
        or the directory's files are missing, corrupt or do not match."""
        try:
            directory = resolve_model_dir(name_or_path)
        except ModelNotFound as exc:
            raise CheckpointError(f"model directory missing: {exc}") from exc
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise CheckpointError(f"{directory} is not a model directory: {path.name} is missing")
        try:
            config = TokenizerConfig.load(config_path)
        except ConfigError as exc:
            raise CheckpointError(f"{config_path}: {exc}") from exc
        try:
            state = load_file(str(weights_path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights_path} is corrupt or not a safetensors file: {exc}") from exc
        model = cls(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{weights_path} does not match {config_path}: {exc}") from exc
        return model.to(map_location)


def _hub_card(config: TokenizerConfig, name: str, params: int, license: str) -> str:
    """A model card for the Hugging Face hub: YAML front matter, then what the model is and how to load it."""
    k, f = config.codebook_size, config.downsample
    bits = math.log2(k)
    if config.quantizer == "fsq":
        tags = ["fsq"]
        quantizer = f"FSQ, levels {list(config.fsq_levels)} (arXiv 2309.15505)"
    else:
        tags = ["vector-quantization"] + (["simvq"] if config.linear_codebook else [])
        kind = "SimVQ (frozen random C, learned linear W; arXiv 2411.02038)" if config.linear_codebook else "VQ"
        grad = "rotation-trick gradients (arXiv 2410.06424)" if config.gradient == "rotation" else "straight-through gradients"
        quantizer = f"{kind}, {grad}, code dimension {config.latent_dim}"
        tags += ["rotation-trick"] if config.gradient == "rotation" else []
    front = "\n".join(
        ["---", "library_name: vqtok", f"license: {license}", "pipeline_tag: image-feature-extraction", "tags:"]
        + [f"- {t}" for t in ["vqtok", "image-tokenizer", *tags]]
        + ["---"]
    )
    rows = [
        ("quantizer", quantizer),
        ("codebook size", f"K = {k:,} ({bits:.3g} bits per token)"),
        ("downsample", f"f = {f}: an H×W image is (H/{f})×(W/{f}) tokens, {bits / f**2:.3g} bits per pixel; H and W multiples of {f}"),
        ("training resolution", f"{config.resolution}×{config.resolution}"),
        ("parameters", f"{params / 1e6:.1f} M"),
        ("preset", config.preset or "(custom)"),
    ]
    table = "\n".join(["| | |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)])
    return f"""{front}

# {name}

A vqtok image tokenizer: images to a grid of discrete token ids and back.
`config.json` rebuilds the network, `model.safetensors` holds the weights (no pickle).

{table}

## Use

```python
import vqtok

tok = vqtok.Tokenizer.from_pretrained("ORG/{name}")  # this repository (pip install 'vqtok[hub]'), or a local directory
ids = tok.encode(x)  # x: float (B, 3, H, W) in [-1, 1] -> int64 (B, H/{f}, W/{f})
y = tok.decode(ids)  # -> float (B, 3, H, W) in [-1, 1]
```
"""


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temporary file beside `path`, renamed over it when complete (models.core.fileio)."""
    with atomic_path(path) as tmp:
        write(tmp)
