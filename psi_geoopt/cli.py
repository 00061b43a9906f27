"""The ``psi-geoopt`` command line: one sub-command per module, parsed here and run there.

Each sub-command module defines ``add_arguments(parser)`` and ``run(args) -> int``; the first
line of its docstring is the sub-command's help.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "demo": "psi_geoopt.experiments.demo",
    "compare": "psi_geoopt.experiments.compare",
    "verify": "psi_geoopt.theory.verify",
    "bench": "psi_geoopt.experiments.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psi-geoopt",
        description="Train batch-normalized networks on the PSI manifold: demo, optimizer "
        "comparisons, convergence-bound checks and benchmarks.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or name).strip().splitlines()[0]
        sub = subparsers.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
