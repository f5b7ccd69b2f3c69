"""The export graphs prepared for a compiled GPU runtime: both networks in float16, the encoder with
the fused Triton code search (`vqtok::nearest_code`), as channels-last modules for `torch.compile`
(static shapes; the runtime captures each compiled shape as a CUDA graph), with cuDNN's
per-shape algorithm search on.

Why float16 and cuDNN's search (bench/compiled_probe.py; figures in BENCHMARKS.md): against the CPU
float32 reference a bfloat16 encoder keeps too few tokens equal to pass the 99.5 % gate, float16
passes it. With `cudnn.benchmark` the float16 graphs are as fast as bfloat16's or faster; without it
cuDNN's heuristic picks slow float16 kernels.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..tokenizer import Tokenizer
from .graphs import DecoderGraph, EncoderGraph

ENCODER_DTYPE = torch.float16
DECODER_DTYPE = torch.float16
PRECISION_LABEL = "fp16"


@dataclass
class CompiledGraphs:
    encoder: Callable[[Tensor], Tensor]  # uint8 (B, H, W, 3) on the device -> int32 (B, H/f, W/f)
    decoder: Callable[[Tensor], Tensor]  # int32 (B, h, w) on the device -> uint8 (B, h·f, w·f, 3)
    precision: str
    fused_search: bool


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
    tok: Tokenizer, device: torch.device, *, compile: bool = True, fused: bool | None = None, mode: str = "default"
) -> CompiledGraphs:
    """The encoder and decoder graphs of `tok` on `device`, compiled (static shapes) unless
    `compile=False` (eager: what CPU tests run). `fused` None: the Triton search where it exists.

    `mode` "max-autotune": Inductor times its candidate kernels (Triton templates against cuDNN and
    cuBLAS) for every convolution and matmul of each shape and keeps the fastest, as torch.compile's
    max-autotune-no-cudagraphs does (the runtime captures its own CUDA graphs). It trades minutes of
    tuning a shape on the first start for faster kernels; BENCHMARKS.md has both modes against
    torch.compile's own max-autotune."""
    from ..quantizers.search_op import register

    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")

    on_cuda = device.type == "cuda"
    if compile:
        configure_inductor()  # before the search op is defined: that may already ask Inductor for its cache
    if fused is None:
        fused = on_cuda and register()
    elif fused and not register():
        raise RuntimeError("the fused code search needs triton (pip install triton)")
    enc_dtype, dec_dtype = (ENCODER_DTYPE, DECODER_DTYPE) if on_cuda else (torch.float32, torch.float32)
    encoder: nn.Module = EncoderGraph(tok, enc_dtype, fused=fused).to(device).eval()
    decoder: nn.Module = DecoderGraph(tok, dec_dtype).to(device).eval()
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
    label = PRECISION_LABEL if on_cuda else "fp32"
    return CompiledGraphs(enc_fn, dec_fn, label, fused)
