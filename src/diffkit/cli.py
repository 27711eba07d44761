"""The `diffkit` command.

Subcommands so far: `demo` (the ring-testbed demo of `make demo`), `solvers` and `schedules` (list names).
Errors are one line on stderr with a non-zero exit status; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  diffkit demo --out outputs/demo
  diffkit solvers
  diffkit schedules
"""


def _cmd_demo(args) -> int:
    from . import demo

    return demo.main(["--out", args.out, "--n", str(args.n), "--seed", str(args.seed)])


def _cmd_solvers(args) -> int:
    from .solvers import get_solver, solvers

    for name in solvers():
        spec = get_solver(name)
        print(f"{name:14s} min NFE {spec.min_nfe:<3d} default schedule {spec.schedule:15s} {spec.summary}")
    return 0


def _cmd_schedules(args) -> int:
    from .schedules import schedules

    print("\n".join(schedules()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffkit", description="Diffusion and flow models through one denoiser.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="sample the 2-D ring testbed and plot error against the exact flow map",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--n", type=int, default=2000, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.set_defaults(func=_cmd_demo)
    sub.add_parser("solvers", help="list the solvers").set_defaults(func=_cmd_solvers)
    sub.add_parser("schedules", help="list the step schedules").set_defaults(func=_cmd_schedules)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        if args.debug:
            raise
        print(f"diffkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
