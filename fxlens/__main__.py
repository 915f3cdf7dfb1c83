"""`python -m fxlens ...` is the `fxlens` command (and `torchrun -m fxlens harvest ...`)."""

import sys

from fxlens.tools.cli import main

sys.exit(main())
