"""`python -m hf_blockcbo.cli` / `accelerate launch -m hf_blockcbo.cli calibrate ...`: the hf-blockcbo command line."""

import sys

from .commands.cli import main


if __name__ == "__main__":
    sys.exit(main())
