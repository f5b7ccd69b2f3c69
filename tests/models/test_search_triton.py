"""Fused nearest-code search: the chunked torch reference against the eager argmin, and the Triton
kernel (through Triton's CPU interpreter, TRITON_INTERPRET=1) against the reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from models.quantizers.functional import nearest_code
from models.quantizers.search_triton import (
    PRECISIONS,
    interpreter_enabled,
    nearest_code_chunked,
    nearest_code_triton,
    triton_available,
)

ROOT = Path(__file__).resolve().parents[2]


def eager_reference(z: Tensor, codebook: Tensor, codebook_sq: Tensor) -> Tensor:
    return torch.argmin(codebook_sq - 2 * (z.float() @ codebook.t()), dim=1)


def random_problem(n: int, k: int, d: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g) * d**-0.5  # SimVQ's init scale
    z = torch.randn(n, d, generator=g) * d**-0.5
    return z, codebook, codebook.pow(2).sum(-1)


def tie_problem(d: int = 32, k: int = 256, seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Codebook with exact duplicates and permuted copies; rows of z that tie between them.

    Every value is a small integer or a multiple of 1/8, so every product and partial sum is exact in
    float32 and tied codes get bitwise-equal scores whatever order a backend sums in (numpy's SIMD
    matmul, under Triton's interpreter, groups a dot product's terms by lane).
    Returns z, codebook, codebook_sq and the expected indices (the lowest of each tied set).
    """
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randint(-8, 9, (k, d), generator=g).float()  # far apart: the planted codes win clearly
    expected = []
    rows = []
    # Exact duplicates spread across chunk / tile / split boundaries, some in the same lane of
    # every tile width (3, 67, 131 = 3 + 64, 3 + 128): the first copy must win.
    for first, copies in ((3, (40, 67, 131, 255)), (70, (64, 65)), (200, (17,))):
        for c in copies:
            codebook[c] = codebook[first]
        low = min(first, *copies)
        rows.append(codebook[first].clone())
        expected.append(low)
        rows.append(codebook[first] + torch.randint(-1, 2, (d,), generator=g).float() / 8)
        expected.append(low)
    # Permuted copies: c = (a, b, rest) and c' = (b, a, rest) have equal norms, and z with
    # z_0 == z_1 has equal dot products with both.
    base = torch.randint(-8, 9, (d,), generator=g).float()
    base[0], base[1] = 7.0, -5.0
    swapped = base.clone()
    swapped[0], swapped[1] = base[1], base[0]
    codebook[90], codebook[33] = base, swapped
    zt = base.clone()
    zt[0] = zt[1] = (base[0] + base[1]) / 2
    rows.append(zt)
    expected.append(33)
    z = torch.stack(rows)
    return z, codebook, codebook.pow(2).sum(-1), torch.tensor(expected)


# --- chunked reference ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k", "d", "chunk"),
    [(1000, 16384, 32, 4096), (777, 5000, 32, 1000), (300, 3000, 3, 256), (200, 2048, 64, 100), (64, 100, 20, 4096)],
)
def test_chunked_equals_eager_argmin(n: int, k: int, d: int, chunk: int) -> None:
    z, codebook, csq = random_problem(n, k, d)
    assert torch.equal(nearest_code_chunked(z, codebook, csq, chunk), eager_reference(z, codebook, csq))


def test_chunked_equals_shipped_search() -> None:
    z, codebook, _ = random_problem(2000, 16384, 32, seed=3)
    csq = codebook.pow(2).sum(-1)
    assert torch.equal(nearest_code_chunked(z, codebook, csq), nearest_code(z, codebook))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_low_precision_input_is_upcast(dtype: torch.dtype) -> None:
    z, codebook, csq = random_problem(500, 4096, 32, seed=4)
    z = z.to(dtype)
    out = nearest_code_chunked(z, codebook, csq, chunk=1000)
    assert torch.equal(out, eager_reference(z.float(), codebook, csq))


@pytest.mark.parametrize("chunk", [1, 16, 64, 65, 4096])
def test_chunked_ties_go_to_lowest_index(chunk: int) -> None:
    z, codebook, csq, expected = tie_problem()
    ref = eager_reference(z, codebook, csq)
    assert torch.equal(ref, expected)  # the construction really ties, and torch.argmin takes the first
    assert torch.equal(nearest_code_chunked(z, codebook, csq, chunk), expected)


def test_chunked_midpoints_match_eager_bitwise() -> None:
    """z halfway between two codes: exact arithmetic ties, fp32 rounding decides; the chunked
    search must decide the same way as the eager one (same arithmetic per entry)."""
    _, codebook, csq = random_problem(1, 4096, 32, seed=5)
    g = torch.Generator().manual_seed(6)
    i = torch.randint(0, 4096, (512,), generator=g)
    j = torch.randint(0, 4096, (512,), generator=g)
    z = (codebook[i] + codebook[j]) / 2
    ref = eager_reference(z, codebook, csq)
    for chunk in (128, 1000, 4096):
        assert torch.equal(nearest_code_chunked(z, codebook, csq, chunk), ref)


def test_chunked_rejects_bad_inputs() -> None:
    z, codebook, csq = random_problem(4, 16, 8)
    with pytest.raises(ValueError):
        nearest_code_chunked(z[:, :4], codebook, csq)
    with pytest.raises(ValueError):
        nearest_code_chunked(z, codebook.double(), csq)
    with pytest.raises(ValueError):
        nearest_code_chunked(z, codebook, csq, chunk=0)


def test_module_imports_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from models.quantizers import search_triton as s\n"
        "assert not s.triton_available()\n"
        "z = torch.randn(5, 4); c = torch.randn(9, 4)\n"
        "print(s.nearest_code_chunked(z, c, c.pow(2).sum(-1)).tolist())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_triton_refuses_cpu_tensors_outside_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, codebook, csq = random_problem(4, 16, 8)
    with pytest.raises(ValueError, match="CUDA"):
        nearest_code_triton(z, codebook, csq)


# --- Triton kernel ----------------------------------------------------------------------------
# The kernel tests run on CUDA when there is a GPU, else on CPU tensors through Triton's
# interpreter. TRITON_INTERPRET=1 must be set before triton is first imported (its standard
# library is decorated at import time), so without a GPU the test below reruns the
# test_kernel_* tests in a child pytest with the variable set.

INTERPRETED = interpreter_enabled()
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"

kernel_test = pytest.mark.skipif(
    not triton_available() or not (INTERPRETED or ON_GPU),
    reason="triton cannot be imported"
    if not triton_available()
    else "no GPU: runs in the TRITON_INTERPRET=1 child of test_triton_kernel_tests_under_interpreter",
)


def on_device(*tensors: Tensor) -> list[Tensor]:
    return [t.to(DEVICE) for t in tensors]


def test_triton_kernel_tests_under_interpreter() -> None:
    if not triton_available():
        pytest.skip("triton cannot be imported: Triton kernel tests skipped")
    if INTERPRETED or ON_GPU:
        pytest.skip("the kernel tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-k", "test_kernel_", "-p", "no:cacheprovider"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    print(res.stdout[-3000:])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and " skipped" not in res.stdout, res.stdout[-3000:]


@kernel_test
@pytest.mark.parametrize(
    ("n", "k", "d", "config", "splits"),
    [
        (64, 256, 32, None, None),  # the shipped D, default tile (autotuned on a GPU)
        (50, 256, 32, {"BLOCK_N": 32, "BLOCK_K": 32}, None),  # N not a multiple of BLOCK_N
        (64, 200, 20, None, None),  # D padded 20 -> 32, K not a multiple of BLOCK_K
        (33, 256, 3, {"BLOCK_N": 16, "BLOCK_K": 64}, 2),  # D padded 3 -> 16, two code slices
        (64, 250, 32, {"BLOCK_N": 64, "BLOCK_K": 128}, 2),  # last slice partly past K
        (40, 300, 4, {"BLOCK_N": 16, "BLOCK_K": 64}, None),  # VQ-f8's and MoVQ's D = 4
        (40, 300, 64, {"BLOCK_N": 16, "BLOCK_K": 64}, None),  # aMUSEd's D = 64
        (24, 200, 256, {"BLOCK_N": 16, "BLOCK_K": 64}, 2),  # taming f16's D = 256: two slices of 128 dims
        (24, 130, 200, {"BLOCK_N": 16, "BLOCK_K": 32}, None),  # D = 200: the second slice partly padded
    ],
)
def test_kernel_equals_reference(n: int, k: int, d: int, config: dict[str, int] | None, splits: int | None) -> None:
    z, codebook, csq = on_device(*random_problem(n, k, d, seed=n + k + d))
    out = nearest_code_triton(z, codebook, csq, "ieee", config=config, splits=splits)
    assert out.dtype == torch.long and out.shape == (n,)
    assert torch.equal(out, nearest_code_chunked(z, codebook, csq))


@kernel_test
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("block_k", [32, 64])
def test_kernel_ties_go_to_lowest_index(splits: int, block_k: int) -> None:
    z, codebook, csq, expected = on_device(*tie_problem())
    out = nearest_code_triton(z, codebook, csq, "ieee", config={"BLOCK_N": 16, "BLOCK_K": block_k}, splits=splits)
    assert torch.equal(out, expected)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision_input(dtype: torch.dtype) -> None:
    z, codebook, csq = on_device(*random_problem(64, 256, 32, seed=7))
    z = z.to(dtype)
    assert torch.equal(nearest_code_triton(z, codebook, csq), nearest_code_chunked(z, codebook, csq))


@kernel_test
@pytest.mark.parametrize("precision", PRECISIONS)
def test_kernel_precisions_run(precision: str) -> None:
    # The interpreter takes every dot in float32, so there this checks plumbing, not TF32
    # accuracy (bench/search_gpu.py measures that on real latents).
    z, codebook, csq = on_device(*random_problem(32, 128, 32, seed=8))
    out = nearest_code_triton(z, codebook, csq, precision)  # type: ignore[arg-type]
    agree = (out == nearest_code_chunked(z, codebook, csq)).float().mean().item()
    assert agree >= 0.9


@kernel_test
def test_kernel_rejects_bad_arguments() -> None:
    z, codebook, csq = on_device(*random_problem(4, 16, 8))
    with pytest.raises(ValueError, match="precision"):
        nearest_code_triton(z, codebook, csq, "fp64")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="BLOCK_K"):
        nearest_code_triton(z, codebook, csq, config={"BLOCK_K": 48})
    assert nearest_code_triton(z[:0], codebook, csq).shape == (0,)
