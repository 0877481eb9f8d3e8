"""``axs predict CKPT --data-dir TILES --output-dir OUT``: write a trained model's optical bands per tile."""

from __future__ import annotations

import argparse
import sys

from axs_lib.cli import add_debug_flag
from axs_lib.errors import EXIT_OK

EPILOG = """examples:
  axs predict runs/exp1/checkpoints/best.pt --data-dir tiles/ --output-dir predictions/
  axs predict runs/exp1/checkpoints/checkpoint_step_100.pt --data-dir tiles/ --output-dir out/ --split test --overwrite
  axs predict runs/seed42/checkpoints/best.pt runs/seed7/checkpoints/best.pt --data-dir tiles/ --output-dir mean/

Each tile <stem> gives <stem>.tif (B2, B3, B4, B8 as float32 reflectance x 10000, with the CRS and
bounds of the tile's sidecar) or, without them in the sidecar, <stem>.npz (s2_b2 .. s2_b8).
Two predictions from the same checkpoints (in the same order) are byte-identical; with several
checkpoints each tile gets the mean of their predictions. Every input is checked before the output
folder is created; existing outputs are refused unless --overwrite, which replaces only them.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="write a Stage-1 model's predicted optical bands per tile (GeoTIFF or NPZ)",
                       description="Predict Sentinel-2 B2, B3, B4, B8 from the SAR of every tile with a trained "
                                   "Stage-1 checkpoint, one GeoTIFF (or NPZ) per tile.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", nargs="+",
                   help="a Stage-1 trainer checkpoint (checkpoint_step_N.pt, best.pt, or latest: the one it names); several: their predictions "
                        "are averaged (runs of other seeds)")
    p.add_argument("--data-dir", required=True, help="directory of <stem>.npz tiles")
    p.add_argument("--output-dir", required=True, help="where the predictions go (created when missing)")
    p.add_argument("--split", choices=("train", "val", "test"), help="only the tiles whose sidecar has this split")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--overwrite", action="store_true", help="replace existing prediction files of these tiles")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from axs_lib.stage1.predict import predict_tiles  # torch: only when predicting

    written = predict_tiles(args.checkpoint, args.data_dir, args.output_dir, overwrite=args.overwrite, split=args.split,
                            device=args.device, progress=not args.quiet and sys.stderr.isatty())
    kinds = sorted({p.suffix for p in written})
    print(f"wrote {len(written)} predictions ({', '.join(kinds)}) to {args.output_dir}")
    return EXIT_OK
