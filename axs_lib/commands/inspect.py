"""``axs inspect CKPT``: what a checkpoint holds and whether it can be trusted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from axs_lib.cli import add_debug_flag
from axs_lib.errors import EXIT_OK

# axs_lib.checkpoint and axs_lib.compare import torch: they are imported by the functions that use
# them, so that building the ``axs`` parser does not.

SECTIONS = ("seed_info", "environment", "data_fingerprint", "config", "metrics", "sampler_state", "early_stopping")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a checkpoint's step, seed, flags, fingerprints, config, metrics and tensors",
        description=(
            "Load a checkpoint safely (weights only), verify its content checksum and print its step, "
            "epoch, seed info, determinism flags, environment and data fingerprints, config, metrics "
            "and how many tensors it holds. Exit 0, or 2 when the file is missing, damaged, unsafe or carries "
            "no checksum (--allow-unverified shows it anyway)."
        ),
        epilog="example:\n  axs inspect runs/exp1/checkpoints/checkpoint_step_100.pt --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file (or checkpoints/latest: the one it names)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--trust", action="store_true",
                   help="load legacy pickles that can run code (only for files you made yourself)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="show a checkpoint that carries no content checksum (another tool's file); "
                        "without it such a file is refused, as a damaged checksum key would look the same")
    add_debug_flag(p)
    p.set_defaults(func=run)


def _plain(obj: Any) -> Any:
    """A nested checkpoint section as JSON-safe values."""
    from axs_lib.report import describe_leaf as jsonable

    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj:
        return [_plain(v) for v in obj]
    return jsonable(obj)


def describe(path: Path, *, trust: bool = False, allow_unverified: bool = False) -> dict:
    """Everything ``axs inspect`` reports about one checkpoint, as JSON-safe values."""
    import torch

    from axs_lib.checkpoint import iter_leaves, tensor_bytes, verify_content
    from axs_lib.checkpoint import load_noting_trust
    from axs_lib.compare import DETERMINISM_FLAGS

    ckpt, notes = load_noting_trust(path, trust=trust, verify=False)
    verified = verify_content(ckpt, path, allow_unverified=allow_unverified or trust)
    body = ckpt if isinstance(ckpt, dict) else {"(root)": ckpt}
    by_section: dict[str, dict[str, int]] = {}
    for leaf_path, leaf in iter_leaves(body):
        if isinstance(leaf, torch.Tensor):
            entry = by_section.setdefault(leaf_path.split(".")[0].split("[")[0], {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += tensor_bytes(leaf).nbytes if leaf.layout == torch.strided else 0
    seed_info = body.get("seed_info") if isinstance(body.get("seed_info"), dict) else {}
    environment = body.get("environment") if isinstance(body.get("environment"), dict) else {}
    flags = {
        f"{name}.{k}": v
        for name, section in (("seed_info", seed_info), ("environment", environment))
        for k, v in section.items()
        if k in DETERMINISM_FLAGS or k.startswith(("cublas", "tf32"))
    }
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "loads_safely": not notes,
        "checksum": "verified" if verified else "NONE: not verified (--allow-unverified; not written by axs, or damaged)",
        "keys": [str(k) for k in body],
        **{k: _plain(body.get(k)) for k in ("format_version", "step", "epoch", "world_size")},
        "determinism_flags": _plain(flags),
        **{k: _plain(body[k]) for k in SECTIONS if k in body},
        "tensors": {
            "count": sum(e["count"] for e in by_section.values()),
            "bytes": sum(e["bytes"] for e in by_section.values()),
            "by_section": by_section,
        },
        "notes": notes,
    }


def render_text(info: dict) -> str:
    """``describe``'s result for people: one ``key: value`` line per field, sections indented."""
    from axs_lib.checkpoint import iter_leaves
    from axs_lib.report import short_repr

    t = info["tensors"]
    lines = [
        f"checkpoint: {info['path']} ({info['file_bytes']:,} bytes)",
        f"loads safely: {'yes (weights only)' if info['loads_safely'] else 'NO: only with --trust, it holds pickled code'}",
        f"checksum: {info['checksum']}",
        *(f"{k}: {info[k]}" for k in ("format_version", "step", "epoch", "world_size") if info[k] is not None),
        f"tensors: {t['count']:,} ({t['bytes'] / 2**20:,.1f} MiB)"
        + "".join(f"\n  {name}: {e['count']:,} ({e['bytes'] / 2**20:,.1f} MiB)" for name, e in t["by_section"].items()),
        "determinism flags:" + ("".join(f"\n  {k}: {v}" for k, v in info["determinism_flags"].items()) or " (none recorded)"),
    ]
    for section in SECTIONS:
        if section in info:
            lines.append(f"{section}:")
            lines += [f"  {k}: {short_repr(v, 72)}" for k, v in iter_leaves(info[section])] or ["  (empty)"]
    lines += [f"note: {n}" for n in info["notes"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from axs_lib.checkpoint import follow_latest

    info = describe(follow_latest(args.checkpoint), trust=args.trust, allow_unverified=args.allow_unverified)
    print(json.dumps(info, indent=2) if args.json else render_text(info))
    return EXIT_OK
