"""What do SSIM and MS-SSIM cost per Kodak image, before and after issue 30's change, and do they agree?

Before: the Gaussian blur as two float64 `F.conv2d` passes on the raw [0, 255] values (the implementation
`vqtok eval` had until issue 30, written out here as the baseline). After: `training.metrics` (float32, values
centred on 0, the blur as 11 weighted shifted views per axis). Each Kodak image (768×512, full size) is
compared with its JPEG at quality 30, one image per call as `vqtok eval` calls them; best of `--repeat`
passes over the 24 images. Prints a table; writes JSON.

    python -m bench.ssim_speed --out bench/results/eval_speed/cpu-DATE/ssim_speed.json
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from bench.harness.record import DATA, host_fields, table, write_json
from training import metrics

# --- the baseline: float64 convolutions on [0, 255] values ---


def _blur_conv64(t: Tensor) -> Tensor:
    b, c, h, w = t.shape
    coords = torch.arange(metrics.WINDOW, dtype=torch.float64) - metrics.WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * metrics.SIGMA**2))
    g = g / g.sum()
    flat = t.reshape(b * c, 1, h, w)
    flat = F.conv2d(flat, g.view(1, 1, 1, -1))
    flat = F.conv2d(flat, g.view(1, 1, -1, 1))
    return flat.reshape(b, c, flat.shape[-2], flat.shape[-1])


def _maps64(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    c = x.shape[1]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y, xx, yy, xy = _blur_conv64(torch.cat([x, y, x * x, y * y, x * y], dim=1)).split(c, dim=1)
    cs = (2 * (xy - mu_x * mu_y) + c2) / (xx - mu_x**2 + yy - mu_y**2 + c2)
    return (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs, cs


def ssim64(x: Tensor, y: Tensor) -> Tensor:
    s, _ = _maps64(x.double(), y.double())
    return s.flatten(1).mean(1)


def ms_ssim64(x: Tensor, y: Tensor) -> Tensor:
    x, y = x.double(), y.double()
    weights = torch.tensor(metrics.MS_SSIM_WEIGHTS, dtype=torch.float64)
    values = []
    for level in range(len(weights)):
        s, cs = _maps64(x, y)
        if level == len(weights) - 1:
            values.append(s.flatten(2).mean(2).clamp_min(0))
        else:
            values.append(cs.flatten(2).mean(2).clamp_min(0))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.prod(torch.stack(values) ** weights[:, None, None], dim=0).mean(1)


def pairs(folder: Path, quality: int) -> list[tuple[Tensor, Tensor]]:
    out = []
    for f in sorted(folder.glob("*.png")):
        img = Image.open(f).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        rec = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        as_t = [torch.from_numpy(np.array(a)).permute(2, 0, 1)[None] for a in (img, rec)]
        out.append((as_t[0], as_t[1]))
    return out


def timed(fn: Any, data: list[tuple[Tensor, Tensor]], repeat: int) -> tuple[float, list[float]]:
    best = float("inf")
    values: list[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        values = [float(fn(x, y)[0]) for x, y in data]
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / len(data), values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA / "kodak")
    ap.add_argument("--quality", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (eval's CPU budget per image)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = pairs(args.data, args.quality)
    rows, result = [], {"question": "SSIM/MS-SSIM CPU time per Kodak image, float64 conv2d against float32 shifted views", **host_fields()}
    figures: dict[str, Any] = {}
    for name, before, after in [("SSIM", ssim64, metrics.ssim), ("MS-SSIM", ms_ssim64, metrics.ms_ssim)]:
        ms_before, v_before = timed(before, data, args.repeat)
        ms_after, v_after = timed(after, data, args.repeat)
        diff = max(abs(a - b) for a, b in zip(v_before, v_after, strict=True))
        figures[name] = {"before_ms": ms_before, "after_ms": ms_after, "speedup": ms_before / ms_after, "max_abs_diff": diff}
        rows.append([name, f"{ms_before:.0f}", f"{ms_after:.0f}", f"{ms_before / ms_after:.2f}×", f"{diff:.1e}"])
    result |= {"images": len(data), "threads": args.threads, "jpeg_quality": args.quality, "figures": figures}
    print(table(["metric", "float64 conv2d ms/image", "float32 views ms/image", "speed-up", "max |Δ| over 24 images"], rows))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
