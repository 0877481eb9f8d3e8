#!/usr/bin/env python
"""Train the Stage-1 SAR-to-optical model: ``axs train stage1`` as a script (see ``--help``)."""

import sys
from pathlib import Path

try:
    from axs_lib.cli import main
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from axs_lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "stage1", *sys.argv[1:]]))
