"""``axs evaluate CKPT --data-dir TILES``: a trained model's quality per band and overall."""

from __future__ import annotations

import argparse
import json
import sys

from axs_lib.cli import add_debug_flag
from axs_lib.errors import EXIT_OK

EPILOG = """examples:
  axs evaluate runs/exp1/checkpoints/best.pt --data-dir tiles/ --split test
  axs evaluate runs/exp1/checkpoints/checkpoint_step_100.pt --data-dir tiles/ --json
  axs evaluate runs/seed42/checkpoints/best.pt runs/seed7/checkpoints/best.pt --data-dir tiles/ --split test

Metrics (axs_lib.stage1.metrics, the same code as the trainer's validation): MAE and RMSE in
reflectance x 10000 and PSNR at data range 10000, all pooled over every valid pixel; SSIM per tile
at the true band's 2-98 % range, averaged over tiles; SAM in degrees over pixels brighter than 0.03.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure a Stage-1 checkpoint on tiles: MAE, RMSE, PSNR, SSIM, SAM per band",
                       description="Run a Stage-1 checkpoint over tiles and print MAE, RMSE, pooled PSNR, SSIM and "
                                   "SAM per band (B2, B3, B4, B8) and overall.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", nargs="+",
                   help="a Stage-1 trainer checkpoint (or checkpoints/latest: the one it names); several: their predictions are averaged (runs of other seeds)")
    p.add_argument("--data-dir", required=True, help="directory of <stem>.npz tiles")
    p.add_argument("--split", choices=("train", "val", "test"), help="only the tiles whose sidecar has this split")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_debug_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from axs_lib.stage1.metrics import jsonable, table
    from axs_lib.stage1.predict import evaluate_model, load_predictor, select_tiles  # torch: only when evaluating

    model = load_predictor(args.checkpoint, args.device)  # the checkpoints first, then the tiles
    tiles = select_tiles(args.data_dir, args.split)
    result = evaluate_model(model, tiles, device=args.device, progress=not args.json and sys.stderr.isatty())
    named = {"checkpoint": args.checkpoint[0]} if len(args.checkpoint) == 1 else {"checkpoints": args.checkpoint}
    result = {**named, "data_dir": args.data_dir, "split": args.split, **result}
    what = args.checkpoint[0] if len(args.checkpoint) == 1 else f"the mean of {len(args.checkpoint)} checkpoints"
    if args.json:
        print(json.dumps(jsonable(result), indent=2, allow_nan=False))
    else:
        print(f"{what} on {result['tiles']} tiles of {args.data_dir}"
              + (f" (split {args.split})" if args.split else "") + ":")
        print(table(result))
    return EXIT_OK
