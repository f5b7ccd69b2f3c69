"""The export graphs prepared for a compiled GPU runtime: both networks in float16, the encoder with
the fused Triton code search (`vqtok::nearest_code`), as channels-last modules for `torch.compile`
(static shapes; the runtime captures each compiled shape as a CUDA graph), with cuDNN's
per-shape algorithm search on.

Why float16 and cuDNN's search (bench/compiled_probe.py; figures in BENCHMARKS.md): against the CPU
float32 reference a bfloat16 encoder keeps too few tokens equal to pass the 99.5 % gate, float16
passes it. With `cudnn.benchmark` the float16 graphs are as fast as bfloat16's or faster; without it
cuDNN's heuristic picks slow float16 kernels.

Why a float32 variant too: where codes are dense in a low code dimension (Kandinsky's MoVQ: 16,384
codes in D = 4) float16 latents move enough of them across a decision boundary to fail the gate; the
float32 networks, with TF32 off while they compile and are captured (`precision_flags`), reproduce the
CPU reference. The runtime tries float16 first and falls back to these (`CompiledRuntime.load`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..tokenizer import Tokenizer
from .graphs import DecoderGraph, EncoderGraph

PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "fp32": torch.float32}  # the networks' dtype on CUDA


@dataclass
class CompiledGraphs:
    encoder: Callable[[Tensor], Tensor]  # uint8 (B, H, W, 3) on the device -> int32 (B, H/f, W/f)
    decoder: Callable[[Tensor], Tensor]  # int32 (B, h, w) on the device -> uint8 (B, h·f, w·f, 3)
    precision: str
    fused_search: bool
    tf32_off: bool = False  # compile and capture with TF32 off (`precision_flags`); else the process's switches


@contextmanager
def precision_flags(graphs: CompiledGraphs) -> Iterator[None]:
    """For `graphs` with `tf32_off`: cuDNN's and cuBLAS's TF32 switches off for the calls inside, then put
    back (torch turns TF32 convolutions on by default). torch reads them when a kernel is chosen, so a
    graph compiled and captured inside keeps full float32 on every replay. Global to the process: callers
    hold the device's capture lock, under which nothing else compiles or captures."""
    if not graphs.tf32_off:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def inductor_cache_dir() -> Path:
    """Where Inductor keeps compiled kernels across processes ($VQTOK_CACHE/inductor): a restart
    finds every shape compiled before and loads it in seconds instead of compiling again."""
    base = os.environ.get("VQTOK_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "vqtok")
    return Path(base) / "inductor"


def configure_inductor() -> None:
    """Inductor's cache in `inductor_cache_dir()` unless the user chose another one. A value equal to
    torch's own default was not chosen: torch writes it into the environment the first time anything
    asks for the cache, and a `setdefault` would keep it: the kernels would land in torch's default
    /tmp/torchinductor_$USER, not in $VQTOK_CACHE/inductor where a restart and the docs look."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        torch_default: str | None = os.path.abspath(default_cache_dir())
    except ImportError:  # a torch without it: only an unset variable is ours to set
        torch_default = None
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or (torch_default is not None and os.path.abspath(current) == torch_default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
    import torch._dynamo
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch.backends.cudnn.benchmark = True  # float16 convolutions: cuDNN's heuristic choice is much slower here
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # one graph per shape


COMPILE_MODES = ("default", "max-autotune")


def compiled_graphs(
    tok: Tokenizer,
    device: torch.device,
    *,
    compile: bool = True,
    fused: bool | None = None,
    mode: str = "default",
    precision: str = "fp16",
) -> CompiledGraphs:
    """The encoder and decoder graphs of `tok` on `device`, compiled (static shapes) unless
    `compile=False` (eager: what CPU tests run). `fused` None: the Triton search where it exists.
    `precision`: the networks' dtype on CUDA, "fp16" or "fp32" (TF32 off); on the CPU always float32.

    `mode` "max-autotune": Inductor times its candidate kernels (Triton templates against cuDNN and
    cuBLAS) for every convolution and matmul of each shape and keeps the fastest, as torch.compile's
    max-autotune-no-cudagraphs does (the runtime captures its own CUDA graphs). It trades minutes of
    tuning a shape on the first start for faster kernels; BENCHMARKS.md has both modes against
    torch.compile's own max-autotune."""
    from ..quantizers.search_op import register

    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")

    on_cuda = device.type == "cuda"
    if compile:
        configure_inductor()  # before the search op is defined: that may already ask Inductor for its cache
    if fused is None:
        fused = on_cuda and register()
    elif fused and not register():
        raise RuntimeError("the fused code search needs triton (pip install triton)")
    dtype = PRECISIONS[precision] if on_cuda else torch.float32
    encoder: nn.Module = EncoderGraph(tok, dtype, fused=fused).to(device).eval()
    decoder: nn.Module = DecoderGraph(tok, dtype).to(device).eval()
    if on_cuda:  # channels-last weights: the NHWC images arrive channels-last already
        encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        decoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    enc_fn: Callable[[Tensor], Tensor] = encoder
    dec_fn: Callable[[Tensor], Tensor] = decoder
    if compile:
        if mode == "default":
            enc_fn = torch.compile(encoder, dynamic=False)
            dec_fn = torch.compile(decoder, dynamic=False)
        else:
            enc_fn = torch.compile(encoder, dynamic=False, mode="max-autotune-no-cudagraphs")
            dec_fn = torch.compile(decoder, dynamic=False, mode="max-autotune-no-cudagraphs")
    label = precision if on_cuda else "fp32"
    return CompiledGraphs(enc_fn, dec_fn, label, fused, tf32_off=on_cuda and precision == "fp32")
