"""``python tools/compare_checkpoints.py A B [options]``: the guide's command, a thin shell over ``axs compare``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the axs_lib beside this script, not another install

from axs_lib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
