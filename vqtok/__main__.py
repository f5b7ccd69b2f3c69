"""`python -m vqtok ...` is the `vqtok` command line, as the console script is; so multi-GPU training
runs as `torchrun --nproc-per-node N -m vqtok train ...`."""

from __future__ import annotations

import sys

from vqtok.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
