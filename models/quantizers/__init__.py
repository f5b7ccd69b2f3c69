"""Quantizers: one file each, shared maths in `functional`."""

from .fsq import FSQ
from .output import QuantizerOutput
from .vq import VectorQuantizer

__all__ = ["FSQ", "QuantizerOutput", "VectorQuantizer"]
