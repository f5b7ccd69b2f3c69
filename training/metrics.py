"""Image quality metrics on (B, 3, H, W) tensors, per image.

Conventions (the ones papers report): images are compared as 8-bit values (pass uint8 or floats in
[0, 255]; data range 255). SSIM is Wang et al. 2004 with an 11×11 Gaussian window (σ = 1.5),
K1 = 0.01, K2 = 0.03, population statistics, valid region only, averaged over channels — the same
numbers as ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255, channel_axis=-1)``. MS-SSIM is Wang et al. 2003 with
5 scales and the standard weights; it needs images of at least 176 px a side (else None).

SSIM and MS-SSIM run in float32 (float64 convolutions cost several times more on a CPU), on values
shifted to [−127.5, 127.5]: a shift changes no variance or covariance, and E[x²] − μ² loses far less of
a small variance in float32 when x² is at most 127.5² than at 255².
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DATA_RANGE = 255.0
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW = 11
SIGMA = 1.5


def _as_float(x: Tensor) -> Tensor:
    return x.double() if x.dtype != torch.float64 else x


def _as_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype != torch.float32 else x


def psnr(x: Tensor, y: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """Per-image PSNR in dB, (B,). Identical images give +inf."""
    mse = (_as_float(x) - _as_float(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_1d(device: torch.device) -> Tensor:
    coords = torch.arange(WINDOW, dtype=torch.float64, device=device) - WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * SIGMA**2))
    return g / g.sum()  # built in float64, then cast: the weights sum to 1 to float32's precision


def _blur(t: Tensor) -> Tensor:
    """Valid-mode separable Gaussian blur of every channel: (B, C, H, W) -> (B, C, H−10, W−10).
    As 11 weighted shifted views per axis, not `F.conv2d`: a single-channel convolution with an 11-tap
    kernel has no fast CPU path (it unfolds 11 copies of the input), while each view is one fused
    multiply-add over contiguous rows; the sums are the same (bench.ssim_speed measures both)."""
    h, w = t.shape[-2:]
    g = _gaussian_1d(torch.device("cpu")).tolist()
    rows = t[..., :, 0 : w - WINDOW + 1] * g[0]
    for k in range(1, WINDOW):
        rows.add_(t[..., :, k : k + w - WINDOW + 1], alpha=g[k])
    out = rows[..., 0 : h - WINDOW + 1, :] * g[0]
    for k in range(1, WINDOW):
        out.add_(rows[..., k : k + h - WINDOW + 1, :], alpha=g[k])
    return out


def _ssim_maps(x: Tensor, y: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    """SSIM and contrast-structure maps over the valid region, (B, C, H−10, W−10) each."""
    c = x.shape[1]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    shift = data_range / 2  # see the module docstring: the moments of the centred values
    x, y = x - shift, y - shift
    # one blur call for the five moments
    moments = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1))
    mu_x, mu_y, xx, yy, xy = moments.split(c, dim=1)
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    mu_x, mu_y = mu_x + shift, mu_y + shift
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return luminance * cs, cs


def ssim(x: Tensor, y: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """Per-image SSIM, (B,), averaged over channels and the valid region."""
    x, y = _as_float32(x), _as_float32(y)
    if min(x.shape[-2:]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW} px a side, got {tuple(x.shape[-2:])}")
    s, _ = _ssim_maps(x, y, data_range)
    return s.flatten(1).mean(1)


def ms_ssim_min_size() -> int:
    return WINDOW * 2 ** (len(MS_SSIM_WEIGHTS) - 1)  # 11 px left at the coarsest of 5 scales


def ms_ssim(x: Tensor, y: Tensor, data_range: float = DATA_RANGE) -> Tensor | None:
    """Per-image MS-SSIM, (B,); None when the images are too small for 5 scales."""
    x, y = _as_float32(x), _as_float32(y)
    if min(x.shape[-2:]) < ms_ssim_min_size():
        return None
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float32, device=x.device)
    values = []
    for level in range(len(MS_SSIM_WEIGHTS)):
        s, cs = _ssim_maps(x, y, data_range)
        if level == len(MS_SSIM_WEIGHTS) - 1:
            values.append(s.flatten(2).mean(2).clamp_min(0))  # (B, C)
        else:
            values.append(cs.flatten(2).mean(2).clamp_min(0))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stack = torch.stack(values, dim=0)  # (levels, B, C)
    per_channel = torch.prod(stack ** weights[:, None, None], dim=0)  # (B, C)
    return per_channel.mean(1)


def mean_finite(values: list[float]) -> float:
    """Mean of per-image values; +inf PSNRs (identical images) are capped at 100 dB so one
    lossless image cannot make the mean infinite."""
    vals = [min(v, 100.0) for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
