"""``python tools/compare_checkpoints.py A B [options]``: the guide's command, a thin shell over ``axs compare``."""

import sys
from pathlib import Path

try:
    import axs_lib  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axs_lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
