"""The ``psi-geoopt`` command line: one sub-command per module, parsed here and run there.

Each sub-command module defines ``add_arguments(parser)`` and ``run(args) -> int``; the first
line of its docstring is the sub-command's help. A sub-command whose module needs a package of
the ``cli`` extra that is not installed is still listed, and running it says which package is
missing and how to install it.
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


CLI_EXTRA = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}
"""The packages of the ``cli`` extra (``pip install 'psi-geoopt[cli]'``): import name to
distribution name."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psi-geoopt",
        description="Train batch-normalized networks on the PSI manifold: demo, optimizer "
        "comparisons, convergence-bound checks and benchmarks.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if _top_level(error) not in CLI_EXTRA:
                raise
            _add_unavailable(subparsers, name, _top_level(error))
            continue
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


def _top_level(error: ModuleNotFoundError) -> str:
    """The top-level package of the module that could not be imported."""
    return (error.name or "").partition(".")[0]


def _missing_extra(name: str, missing: str) -> str:
    return (
        f"psi-geoopt {name} needs {CLI_EXTRA[missing]}, one of the command line's extra "
        "dependencies: pip install 'psi-geoopt[cli]'"
    )


def _add_unavailable(subparsers, name: str, missing: str) -> None:
    """List sub-command ``name``, whose module cannot be imported without ``missing``; running
    it prints one line naming the extra that brings it."""
    sub = subparsers.add_parser(
        name, help=f"(unavailable: {_missing_extra(name, missing)})", add_help=False
    )

    def unavailable(_: argparse.Namespace) -> int:
        raise ModuleNotFoundError(name=missing)

    sub.set_defaults(run=unavailable, takes_any_arguments=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.run(args) or 0)
    except ModuleNotFoundError as error:  # imported when needed, e.g. the digits for verify
        if _top_level(error) not in CLI_EXTRA:
            raise
        print(f"error: {_missing_extra(args.command, _top_level(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
