"""`torch.ops.vqtok.nearest_code`: the fused Triton search (`search_triton.py`) as a torch custom
op that `torch.compile`, `torch.export` and AOTInductor see through (`torch.library.triton_op`), so
a compiled encoder graph carries the kernel inside it (an AOTInductor package embeds its binary).

`register()` defines the op once per process (it needs triton); graphs that use it
(`VQGraph(fused=True)`) must be built after.
"""

from __future__ import annotations

import functools

from torch import Tensor

from .search_triton import _kernels, launch_plan, merge_splits, triton_available, triton_cdiv


@functools.lru_cache(maxsize=1)
def register() -> bool:
    """Define `vqtok::nearest_code` (z (N, D) float, codebook (K, D) fp32, codebook_sq (K,) fp32,
    precision -> int64 (N,)); False where triton is missing. Default precision "tf32x3": float32
    accuracy (the same codes as the float32 argmin on real latents) at tensor-core speed, several times
    faster than "ieee" (bench/search_gpu.py; figures in BENCHMARKS.md)."""
    if not triton_available():
        return False
    from torch.library import triton_op, wrap_triton

    @triton_op("vqtok::nearest_code", mutates_args=())
    def nearest_code(z: Tensor, codebook: Tensor, codebook_sq: Tensor, precision: str = "tf32x3") -> Tensor:
        _, tuned = _kernels(False)
        plan = launch_plan(z, codebook, codebook_sq)
        n = z.shape[0]

        def grid(meta: dict[str, int]) -> tuple[int, int]:
            return (triton_cdiv(n, meta["BLOCK_N"]), plan.n_splits)

        wrap_triton(tuned)[grid](*plan.args, **plan.constants, PRECISION=precision)
        return merge_splits(plan.out_val, plan.out_idx)

    return True
