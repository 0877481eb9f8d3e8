#!/usr/bin/env python
"""Train the Stage-1 SAR-to-optical model: ``axs train stage1`` as a script (see ``--help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the axs_lib beside this script, not another install

from axs_lib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", "stage1", *sys.argv[1:]]))
