"""`python -m clients ...` runs the `vqtok` command line (handy where the console script is not installed)."""

import sys

from clients.cli import main

sys.exit(main())
