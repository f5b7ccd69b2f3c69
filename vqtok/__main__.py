"""`python -m vqtok ...` is the `vqtok` command line, as the console script is; so multi-GPU training
runs as `torchrun --nproc-per-node N -m vqtok train ...` (`-m clients` works too)."""

from __future__ import annotations

import sys

from clients.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
