"""``axs tiles``: validate, summarise and make tiles (from BigEarthNet, the embedded demo, synthetic)."""

from __future__ import annotations

import argparse
import collections
import json

from axs_lib import argtypes
from axs_lib.errors import EXIT_FAILURE, EXIT_OK
from axs_lib.ingest import IngestReport, RebenReport, convert_bigearthnet, convert_reben, write_demo_tiles, write_synthetic_tiles
from axs_lib.packed import DEFAULT_SHARD_TILES, pack_tiles
from axs_lib.tiles import display_path, scan_tiles, summarize, tile_shape, validate_tile

_RAW = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    tiles = sub.add_parser(
        "tiles",
        help="validate, summarise and make NPZ tiles",
        description="Check tiles against the tile contract, summarise their metadata, or make tiles.",
        epilog="examples:\n  axs tiles demo tiles/\n  axs tiles validate tiles/\n  axs tiles summary tiles/ --json",
        formatter_class=_RAW,
    )
    tiles.set_defaults(func=lambda args: tiles.print_help() or 2)
    cmds = tiles.add_subparsers(dest="tiles_command", metavar="ACTION")

    p = cmds.add_parser(
        "validate",
        help="check every tile and sidecar in a directory",
        description=(
            "Check every <stem>.npz tile and <stem>.json sidecar in DIR: arrays, 2-D, one shape, dtypes, "
            "inf and all-NaN bands, plausible SAR dB and reflectance scale, valid-pixel fraction, sidecar "
            "JSON and field types, tile size limits, one tile size for the whole set. Prints one line per "
            "bad tile, then a summary (--json: one JSON object). "
            "Exit 0 when every tile is good, 1 when any is bad, 2 on usage errors."
        ),
        epilog="example:\n  axs tiles validate tiles/",
        formatter_class=_RAW,
    )
    p.add_argument("dir", metavar="DIR", help="directory of tiles")
    p.add_argument("--json", action="store_true", help="print one JSON object (problems by tile, sizes) instead of text")
    p.set_defaults(func=run_validate)

    p = cmds.add_parser(
        "summary",
        help="what the tiles' metadata says",
        description="Count tiles by split, country, platform, label and size, and give the acquisition date range.",
        epilog="example:\n  axs tiles summary tiles/ --json > tiles_summary.json",
        formatter_class=_RAW,
    )
    p.add_argument("dir", metavar="DIR", help="directory of tiles")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run_summary)

    p = cmds.add_parser(
        "from-bigearthnet",
        help="convert BigEarthNet S1/S2 patch folders to tiles",
        description=(
            "Convert BigEarthNet patch folders (one GeoTIFF per band) into tiles named after the S2 patch, "
            "with dates, product names, CRS, bounds, labels and official split in the sidecar. "
            "With --metadata: BigEarthNet v2 (reBEN) -- S1_ROOT is BigEarthNet-S1/, S2_ROOT is "
            "BigEarthNet-S2/, pairs, labels, split, country and snow/cloud flags come from "
            "metadata.parquet, and snow/cloud patches are left out unless --keep-snow-cloud. "
            "Without it: BigEarthNet v1.0 (each S1 folder's *_labels_metadata.json names its S2 "
            "partner). A rerun after an interruption continues where it stopped. Unpaired or "
            "unreadable patches are reported and skipped (exit 1). Existing different files in "
            "OUT_DIR are never overwritten (exit 2)."
        ),
        epilog=(
            "examples:\n  axs tiles from-bigearthnet BigEarthNet-S1/ BigEarthNet-S2/ tiles/ --metadata metadata.parquet --jobs 8\n"
            "  axs tiles from-bigearthnet BigEarthNet-S1-v1.0/ BigEarthNet-v1.0/ tiles/"
        ),
        formatter_class=_RAW,
    )
    p.add_argument("s1_root", metavar="S1_ROOT", help="directory of BigEarthNet-S1 patch folders")
    p.add_argument("s2_root", metavar="S2_ROOT", help="directory of BigEarthNet-S2 patch folders")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write tiles")
    p.add_argument("--metadata", metavar="PARQUET", help="reBEN metadata.parquet: read the BigEarthNet v2 layout")
    p.add_argument("--keep-snow-cloud", action="store_true", help="keep patches flagged with seasonal snow or cloud/shadow (v2)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes reading GeoTIFFs (v2; default 1)")
    p.set_defaults(func=run_from_bigearthnet)

    p = cmds.add_parser(
        "pack",
        help="pack tiles into memory-mapped shards",
        description=(
            "Write the tiles of DIR as shards of --shard-tiles tiles each (a 1-D uint8 .npy per shard "
            "plus its JSON index, sidecar metadata included) and OUT/pack.json. Every reader, the "
            "trainer included, takes OUT like a directory of tiles, with O(1) random access per tile "
            "and no per-tile file. The data fingerprint of OUT equals that of DIR. OUT must be new or empty."
        ),
        epilog="example:\n  axs tiles pack tiles/ tiles_packed/",
        formatter_class=_RAW,
    )
    p.add_argument("dir", metavar="DIR", help="directory of tiles")
    p.add_argument("out_dir", metavar="OUT", help="where to write the packed tiles (new or empty)")
    p.add_argument("--shard-tiles", type=int, default=DEFAULT_SHARD_TILES, help=f"tiles per shard (default {DEFAULT_SHARD_TILES})")
    p.set_defaults(func=run_pack)

    p = cmds.add_parser(
        "demo",
        help="write the six real BigEarthNet demo tiles",
        description=(
            "Write the six real Sentinel-1/Sentinel-2 pairs shipped inside the bigearthnet-common wheel "
            "as tiles (no network). Repeating it into the same directory is a no-op."
        ),
        epilog="example:\n  axs tiles demo tiles/",
        formatter_class=_RAW,
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write tiles")
    p.set_defaults(func=run_demo)

    p = cmds.add_parser(
        "synth",
        help="write synthetic tiles (for scale tests and benchmarks)",
        description="Write plausible synthetic tiles synth_00000.npz, ...; their sidecars say \"synthetic\": true.",
        epilog="example:\n  axs tiles synth /tmp/synth --count 1000 --size 64 --seed 0",
        formatter_class=_RAW,
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write tiles")
    p.add_argument("--count", type=int, required=True, help="number of tiles")
    p.add_argument("--size", type=int, default=120, help="tile side in pixels (default 120, as BigEarthNet)")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="seed (default 0)")
    p.set_defaults(func=run_synth)


def run_validate(args: argparse.Namespace) -> int:
    paths = scan_tiles(args.dir)
    bad: dict[str, list[str]] = {}
    sizes: collections.Counter = collections.Counter()
    for path in paths:
        problems = validate_tile(path)
        if problems:
            bad[display_path(path)] = problems
            if not args.json:
                print(f"{display_path(path)}: {'; '.join(problems)}")
        else:
            sizes["x".join(map(str, tile_shape(path) or ()))] += 1
    mixed = len(sizes) > 1
    if args.json:
        print(json.dumps({"directory": display_path(args.dir), "checked": len(paths), "good": len(paths) - len(bad),
                          "bad": len(bad), "problems": bad, "tile_sizes": dict(sorted(sizes.items())), "mixed_sizes": mixed}, indent=2))
    else:
        if mixed:
            print(f"tiles differ in size ({', '.join(f'{k}: {v}' for k, v in sorted(sizes.items()))}); one run needs one tile size")
        print(f"{len(paths)} tiles checked in {display_path(args.dir)}: {len(paths) - len(bad)} good, {len(bad)} bad")
    return EXIT_FAILURE if bad or mixed else EXIT_OK


def run_summary(args: argparse.Namespace) -> int:
    summary = summarize(args.dir)
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    print(f"{summary['num_tiles']} tiles in {summary['directory']} ({summary['unreadable']} unreadable, {summary['synthetic']} synthetic)")
    for key in ("by_split", "tile_sizes", "countries", "platforms"):
        print(f"{key.replace('_', ' ')}: " + (", ".join(f"{k} {v}" for k, v in summary[key].items()) or "none"))
    dates = summary["date_range"]
    print(f"dates: {dates[0]} to {dates[1]}" if dates else "dates: none")
    print(f"labels ({len(summary['labels'])}):")
    for label, count in summary["labels"].items():
        print(f"  {count:6d}  {label}")
    return EXIT_OK


def _print_report(report: IngestReport, out_dir: str) -> int:
    for patch, reason in report.skipped:
        print(f"skipped {patch}: {reason}")
    print(f"{len(report.written)} tiles written, {len(report.unchanged)} already present, {len(report.skipped)} patches skipped -> {out_dir}")
    return EXIT_FAILURE if report.skipped else EXIT_OK


MAX_SKIPPED_LINES = 20


def run_from_bigearthnet(args: argparse.Namespace) -> int:
    if args.metadata is None:
        return _print_report(convert_bigearthnet(args.s1_root, args.s2_root, args.out_dir), args.out_dir)
    report = convert_reben(args.s1_root, args.s2_root, args.out_dir, args.metadata,
                           keep_snow_cloud=args.keep_snow_cloud, jobs=args.jobs, progress=True)
    return _print_reben_report(report, args.out_dir)


def _print_reben_report(report: RebenReport, out_dir: str) -> int:
    for patch, reason in report.skipped[:MAX_SKIPPED_LINES]:
        print(f"skipped {patch}: {reason}")
    if len(report.skipped) > MAX_SKIPPED_LINES:
        print(f"... and {len(report.skipped) - MAX_SKIPPED_LINES} more skipped patches")
    done = report.written + report.present
    rate = report.written / report.seconds if report.seconds > 0 else 0.0
    print(f"{report.written} tiles written ({rate:.1f}/s), {report.present} already present, "
          f"{report.snow_cloud} snow/cloud patches left out (--keep-snow-cloud keeps them), "
          f"{len(report.skipped)} patches skipped -> {out_dir} ({done} tiles)")
    return EXIT_FAILURE if report.skipped else EXIT_OK


def run_pack(args: argparse.Namespace) -> int:
    result = pack_tiles(args.dir, args.out_dir, args.shard_tiles)
    print(f"{result['tiles']} tiles packed into {result['shards']} shard(s) in {args.out_dir}")
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    paths = write_demo_tiles(args.out_dir)
    print(f"{len(paths)} real BigEarthNet demo tiles in {args.out_dir}")
    return EXIT_OK


def run_synth(args: argparse.Namespace) -> int:
    paths = write_synthetic_tiles(args.out_dir, args.count, args.size, args.seed)
    print(f"{len(paths)} synthetic {args.size}x{args.size} tiles in {args.out_dir} (seed {args.seed})")
    return EXIT_OK
