"""Fused nearest-code search: argmin_k (‖c_k‖² − 2 z·c_k) for every row z, without the N×K matrix.

The shipped search (``functional.nearest_code``) writes an N×K score block and reads it back for the
argmin; at N = 65,536 tokens and K = 16,384 codes that is 4 GiB of traffic per pass. The kernel here
streams code tiles through registers instead: each program holds BLOCK_N rows of z, takes the
(BLOCK_N × BLOCK_K) tile product with ``tl.dot``, adds ‖c‖², and keeps a running (min, argmin) per
row, so only z, C and N indices ever touch memory.

Semantics (both functions below, and the eager reference ``argmin(‖c‖² − 2·z@Cᵀ)``):

- distances are ‖c‖² − 2·(z·c) in float32 (‖z‖² is a per-row constant and left out); z may be
  float32, bfloat16 or float16 and is upcast to float32 (exactly) before the products;
- ties go to the lowest code index, as ``torch.argmin`` does;
- inputs must be finite: a NaN score is never selected here, whereas ``torch.argmin`` returns it.

``precision`` picks how the kernel takes z·cᵀ on tensor-core hardware: ``"ieee"`` is plain float32
(FMA units; the default, for token agreement with the float32 reference), ``"tf32"`` rounds both
operands to TF32 (10-bit mantissa; fast, flips near-ties), ``"tf32x3"`` splits each operand into
two TF32 halves and takes three products (close to float32 accuracy at tensor-core speed).

Triton is imported lazily: this module imports without it, and ``triton_available()`` says
whether the kernel can be built. Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors
through Triton's interpreter (slow; for tests only).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

Precision = Literal["ieee", "tf32", "tf32x3"]
PRECISIONS: tuple[str, ...] = ("ieee", "tf32", "tf32x3")

# Widest slice of the code dimension one tile product takes: up to it, z and C tiles hold the whole
# (padded) dimension and z is loaded once; wider codes (256 for taming's f16 VQGAN) are taken in
# slices of this width, accumulated per code tile. Powers of two >= 16 as `tl.dot` needs.
MAX_TILE_DIM = 128
# Every BLOCK_K below divides this, so a split of the code range is a whole number of tiles.
_SPLIT_ALIGN = 128
# Launch at least this many programs per multiprocessor (small N: split the code range instead).
_PROGRAMS_PER_SM = 4
# Used when no config is named and autotuning is off (interpreter mode).
DEFAULT_CONFIG: dict[str, int] = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
# Autotune space: BLOCK_N × BLOCK_K tiles of fp32 score/value/index live in registers, so the
# tiles stay at or under 128 × 128 with 8 warps.
AUTOTUNE_CONFIGS: tuple[dict[str, int], ...] = (
    {"BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
)
_MIN_BLOCK_N = min(c["BLOCK_N"] for c in (*AUTOTUNE_CONFIGS, DEFAULT_CONFIG))


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (the kernel still needs CUDA tensors,
    or ``TRITON_INTERPRET=1`` for CPU tensors)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# --- pure torch reference -------------------------------------------------------------------


def _check_inputs(z: Tensor, codebook: Tensor, codebook_sq: Tensor) -> None:
    if z.ndim != 2 or codebook.ndim != 2 or codebook_sq.ndim != 1:
        raise ValueError(
            f"expected z (N, D), codebook (K, D), codebook_sq (K,), got {tuple(z.shape)}, {tuple(codebook.shape)}, {tuple(codebook_sq.shape)}"
        )
    if z.shape[1] != codebook.shape[1] or codebook.shape[0] != codebook_sq.shape[0]:
        raise ValueError(f"shape mismatch: z {tuple(z.shape)}, codebook {tuple(codebook.shape)}, codebook_sq {tuple(codebook_sq.shape)}")
    if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"z must be float32, bfloat16 or float16, got {z.dtype}")
    if codebook.dtype != torch.float32 or codebook_sq.dtype != torch.float32:
        raise ValueError(f"codebook and codebook_sq must be float32, got {codebook.dtype}, {codebook_sq.dtype}")
    if codebook.shape[0] < 1:
        raise ValueError("empty codebook")
    if not (z.device == codebook.device == codebook_sq.device):
        raise ValueError(f"z, codebook, codebook_sq on different devices: {z.device}, {codebook.device}, {codebook_sq.device}")


def nearest_code_chunked(z: Tensor, codebook: Tensor, codebook_sq: Tensor, chunk: int = 4096) -> Tensor:
    """The kernel's algorithm in torch: stream over chunks of `chunk` codes keeping a running
    (min, argmin) per row. z (N, D) float, codebook (K, D) fp32, codebook_sq (K,) fp32 -> int64 (N,).

    Scores are ``codebook_sq − 2·(z @ Cᵀ)`` per chunk, the eager reference's arithmetic, and a later
    chunk replaces the running best only when strictly smaller, so ties keep the lowest index and
    the result equals ``argmin(codebook_sq − 2·z@Cᵀ)`` whenever the GEMM gives each entry the same
    value in a column slice as in the whole product (the case on CPU and cuBLAS for small D).
    At most N × chunk scores exist at once. Runs anywhere; torch.compile fuses the score and
    the row-min of each chunk into one pass over the GEMM output (the loop unrolls, K/chunk steps).
    """
    _check_inputs(z, codebook, codebook_sq)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with torch.no_grad():
        z = z.float()
        n, k = z.shape[0], codebook.shape[0]
        best_val = torch.full((n,), float("inf"), dtype=torch.float32, device=z.device)
        best_idx = torch.zeros((n,), dtype=torch.long, device=z.device)
        for start in range(0, k, chunk):
            stop = min(start + chunk, k)
            scores = codebook_sq[start:stop] - 2 * (z @ codebook[start:stop].t())  # (N, chunk)
            val, idx = scores.min(dim=1)  # first minimum on ties
            better = val < best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + start, best_idx)
        return best_idx


# --- Triton kernel --------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """Build (plain kernel, autotuned kernel). Cached per interpreter mode, since ``triton.jit``
    decides at decoration time whether it compiles or interprets."""
    import triton
    import triton.language as tl

    def nearest_code_kernel(
        z_ptr,
        c_ptr,
        csq_ptr,
        out_val_ptr,
        out_idx_ptr,
        N,
        K,
        D,
        stride_zn,
        stride_zd,
        stride_ck,
        stride_cd,
        N_BUCKET,  # autotune key only: log2 bucket of N, so a new batch size does not retune
        K_PER_SPLIT: tl.constexpr,
        D_PAD: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < N
        # Padded dims are zero in z and C: they add exact zeros to every product.
        if D_PAD == BLOCK_D:  # constexpr: the whole code dimension in one tile, z loaded once
            z = tl.load(
                z_ptr + rows[:, None].to(tl.int64) * stride_zn + dims[None, :] * stride_zd,
                mask=row_ok[:, None] & (dims < D)[None, :],
                other=0.0,
            ).to(tl.float32)
        # Lane-wise running best over the tiles: lane j holds the best of codes k0 + j. Strict <
        # keeps the earliest code of a lane on ties; the lanes are merged once, after the loop.
        best_val = tl.full((BLOCK_N, BLOCK_K), float("inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_N, BLOCK_K), tl.int32)
        k_start = pid_s * K_PER_SPLIT
        # Constant trip count (K_PER_SPLIT is a multiple of BLOCK_K): also the only loop form
        # Triton 3.6's interpreter runs under NumPy >= 2.4 (a tensor loop bound fails there).
        for t in range(0, K_PER_SPLIT // BLOCK_K):
            codes = k_start + t * BLOCK_K + tl.arange(0, BLOCK_K)
            code_ok = codes < K
            if D_PAD == BLOCK_D:
                c = tl.load(
                    c_ptr + codes[:, None].to(tl.int64) * stride_ck + dims[None, :] * stride_cd,
                    mask=code_ok[:, None] & (dims < D)[None, :],
                    other=0.0,
                )
                dot = tl.dot(z, tl.trans(c), input_precision=PRECISION)  # (BLOCK_N, BLOCK_K) fp32
            else:  # wide codes: slices of BLOCK_D dims, z's slices re-read per code tile (from cache)
                dot = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
                for dc in tl.static_range(D_PAD // BLOCK_D):
                    sl = dc * BLOCK_D + dims
                    zs = tl.load(
                        z_ptr + rows[:, None].to(tl.int64) * stride_zn + sl[None, :] * stride_zd,
                        mask=row_ok[:, None] & (sl < D)[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    cs = tl.load(
                        c_ptr + codes[:, None].to(tl.int64) * stride_ck + sl[None, :] * stride_cd,
                        mask=code_ok[:, None] & (sl < D)[None, :],
                        other=0.0,
                    )
                    dot += tl.dot(zs, tl.trans(cs), input_precision=PRECISION)
            csq = tl.load(csq_ptr + codes, mask=code_ok, other=float("inf"))
            score = csq[None, :] - 2.0 * dot  # masked codes: inf, never taken
            better = score < best_val
            best_val = tl.where(better, score, best_val)
            best_idx = tl.where(better, codes[None, :], best_idx)
        row_min = tl.min(best_val, axis=1)
        # Among the lanes that reach the minimum, the lowest code index (torch.argmin's tie rule).
        cand = tl.where(best_val == row_min[:, None], best_idx, 2147483647)
        row_idx = tl.min(cand, axis=1)
        out = pid_s.to(tl.int64) * N + rows
        tl.store(out_val_ptr + out, row_min, mask=row_ok)
        tl.store(out_idx_ptr + out, row_idx, mask=row_ok)

    plain = triton.jit(nearest_code_kernel)
    configs = [
        triton.Config({"BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
        for c in AUTOTUNE_CONFIGS
    ]
    tuned = triton.autotune(configs=configs, key=["N_BUCKET", "K_PER_SPLIT", "D_PAD", "PRECISION"])(triton.jit(nearest_code_kernel))
    return plain, tuned


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _split_count(n: int, k: int, device: torch.device) -> int:
    """How many slices of the code range to search in parallel: enough programs to fill the GPU
    when N alone gives too few row blocks (batch 1: 1,024 rows = 16 blocks of 64 on 132 SMs)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    row_blocks = math.ceil(n / _MIN_BLOCK_N)
    want = math.ceil(_PROGRAMS_PER_SM * sms / row_blocks)
    return max(1, min(want, math.ceil(k / _SPLIT_ALIGN)))


def best_config(precision: Precision = "ieee") -> dict[str, Any] | None:
    """The autotuner's choice(s) so far for `precision` (None before the first autotuned call)."""
    if not triton_available():
        return None
    _, tuned = _kernels(interpreter_enabled())
    found = {str(key): str(cfg) for key, cfg in getattr(tuned, "cache", {}).items() if precision in key}
    return found or None


def nearest_code_triton(
    z: Tensor,
    codebook: Tensor,
    codebook_sq: Tensor,
    precision: Precision = "ieee",
    *,
    config: dict[str, int] | None = None,
    splits: int | None = None,
) -> Tensor:
    """Nearest code per row with the fused Triton kernel -> int64 (N,).

    z (N, D) float32/bfloat16/float16, codebook (K, D) float32, codebook_sq (K,) float32 = ‖c‖²,
    all on one CUDA device (or on CPU with ``TRITON_INTERPRET=1``); any D (wider than MAX_TILE_DIM in slices).
    `config` ({"BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}) fixes the tile shape instead of
    autotuning (autotuning is off in interpreter mode, which uses DEFAULT_CONFIG);
    `splits` overrides how many slices of the code range run in parallel (default: enough
    programs to fill the GPU). Slices are merged lowest-first, so ties still go to the lowest index.
    """
    _check_inputs(z, codebook, codebook_sq)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    n = z.shape[0]
    k = codebook.shape[0]
    if k >= 2**31:
        raise ValueError("codebook too large for int32 indices")
    interpret = interpreter_enabled()
    if z.device.type != "cuda" and not interpret:
        raise ValueError(f"nearest_code_triton needs CUDA tensors (or TRITON_INTERPRET=1), got {z.device}")
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    plain, tuned = _kernels(interpret)

    plan = launch_plan(z, codebook, codebook_sq, splits)
    n_splits, args, constants = plan.n_splits, plan.args, plan.constants
    out_val, out_idx = plan.out_val, plan.out_idx
    # Triton launches on the current device: switch only when z lives elsewhere (the switch costs
    # microseconds, which show at batch 1).
    on_other_gpu = z.device.type == "cuda" and z.device.index != torch.cuda.current_device()
    with torch.cuda.device(z.device) if on_other_gpu else contextlib.nullcontext():
        if config is None and not interpret:
            grid = lambda meta: (triton_cdiv(n, meta["BLOCK_N"]), n_splits)  # noqa: E731
            tuned[grid](*args, **constants, PRECISION=precision)
        else:
            cfg = {**DEFAULT_CONFIG, **(config or {})}
            if _SPLIT_ALIGN % cfg["BLOCK_K"]:
                raise ValueError(f"BLOCK_K must divide {_SPLIT_ALIGN}, got {cfg['BLOCK_K']}")
            grid2 = (triton_cdiv(n, cfg["BLOCK_N"]), n_splits)
            plain[grid2](
                *args,
                **constants,
                BLOCK_N=cfg["BLOCK_N"],
                BLOCK_K=cfg["BLOCK_K"],
                PRECISION=precision,
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
            )
    return merge_splits(out_val, out_idx)


@dataclass
class LaunchPlan:
    """How one search is cut: slices of the code range searched in parallel, their output buffers,
    and the kernel's arguments (shared by `nearest_code_triton` and the custom op in search_op.py)."""

    n_splits: int
    out_val: Tensor  # float32 (n_splits, N): each slice's best score per row
    out_idx: Tensor  # int32 (n_splits, N): each slice's best code per row
    args: tuple[Any, ...]
    constants: dict[str, int]  # K_PER_SPLIT, D_PAD, BLOCK_D


def launch_plan(z: Tensor, codebook: Tensor, codebook_sq: Tensor, splits: int | None = None) -> LaunchPlan:
    n, d = z.shape
    k = codebook.shape[0]
    d_pad, block_d = padded_dims(d)
    n_splits = splits if splits is not None else _split_count(n, k, z.device)
    n_splits = max(1, min(n_splits, math.ceil(k / _SPLIT_ALIGN)))
    k_per_split = math.ceil(math.ceil(k / n_splits) / _SPLIT_ALIGN) * _SPLIT_ALIGN
    n_splits = math.ceil(k / k_per_split)
    out_val = torch.empty((n_splits, n), dtype=torch.float32, device=z.device)
    out_idx = torch.empty((n_splits, n), dtype=torch.int32, device=z.device)
    args = (
        z,
        codebook,
        codebook_sq.contiguous(),
        out_val,
        out_idx,
        n,
        k,
        d,
        z.stride(0),
        z.stride(1),
        codebook.stride(0),
        codebook.stride(1),
        max(0, (n - 1).bit_length()),  # N_BUCKET: the autotune key
    )
    return LaunchPlan(n_splits, out_val, out_idx, args, {"K_PER_SPLIT": k_per_split, "D_PAD": d_pad, "BLOCK_D": block_d})


def padded_dims(d: int) -> tuple[int, int]:
    """(D_PAD, BLOCK_D): the code dimension padded for the tiles, and the slice one product takes.
    Up to MAX_TILE_DIM one slice of the next power of two (>= 16, `tl.dot`'s least); wider, slices of
    MAX_TILE_DIM (D_PAD a multiple of it)."""
    if d <= MAX_TILE_DIM:
        width = max(16, 1 << (d - 1).bit_length())
        return width, width
    return -(-d // MAX_TILE_DIM) * MAX_TILE_DIM, MAX_TILE_DIM


def merge_splits(out_val: Tensor, out_idx: Tensor) -> Tensor:
    """The best code per row over the slices -> int64 (N,); argmin takes the first (lowest-code)
    slice on ties, so the tie rule of torch.argmin holds."""
    if out_val.shape[0] == 1:
        return out_idx[0].long()
    which = out_val.argmin(dim=0, keepdim=True)
    return out_idx.gather(0, which).squeeze(0).long()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
