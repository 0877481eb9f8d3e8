"""``axs env``: print the environment fingerprint (the guide's "save environment info" step)."""

from __future__ import annotations

import argparse
import json

from axs_lib.cli import add_debug_flag
from axs_lib.portable import PINNED_ENV


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "env",
        help="print the environment fingerprint",
        description="Print what about this machine and software can change a run's bits.",
        epilog="example:\n  axs env --json --packages > environment.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--packages", action="store_true", help="include every installed package and its version")
    add_debug_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the fingerprint needs torch, and building the parser must not.
    from axs_lib.fingerprint.environment import environment_fingerprint, environment_report
    from axs_lib.portable import in_effect

    report = environment_report() if args.packages else {"fingerprint": environment_fingerprint()}
    report["pinning"] = in_effect()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
        return 0
    rows = dict(report["fingerprint"])
    rows["gpus"] = "; ".join(f"{g['name']} (sm {g['capability']})" for g in rows["gpus"]) or "none"
    rows["env"] = " ".join(f"{k}={v}" for k, v in rows["env"].items()) or "(none set)"
    pin = report["pinning"]
    rows["pinning"] = (f"{'portable' if pin['portable'] else 'not portable'}: {pin['intra_op_threads']} threads, ATen "
                       f"{pin['cpu_capability']}, " + ", ".join(f"{k}={pin[k] or 'unset'}" for k in PINNED_ENV)
                       + ("" if pin["cpu_has_avx2"] else "; this CPU has no AVX2: --portable cannot run here"))
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    if args.packages:
        print()
        for name, version in report["packages"].items():
            print(f"{name}=={version}")
    return 0
