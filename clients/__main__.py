"""`python -m clients ...` runs the `vqtok` command line, as `python -m vqtok ...` does (kept for
scripts and `torchrun ... -m clients train` written before the `vqtok` package existed)."""

import sys

from clients.cli import main

if __name__ == "__main__":
    sys.exit(main())
