"""The ``psi-geoopt-cli`` directive: the command-line reference, generated from
:func:`psi_geoopt.cli.build_parser` so that it cannot drift from the code.

For the program and for each sub-command: its description rendered as reStructuredText (the
module docstring, with its math), then its usage and options exactly as ``--help`` prints them.
Use it in reStructuredText (in a MyST page: inside ``{eval-rst}``).
"""

from __future__ import annotations

import argparse
import copy

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from psi_geoopt.cli import PlainTextHelpFormatter, build_parser

WIDTH = 92


def _usage_and_options(parser: argparse.ArgumentParser) -> str:
    """``parser --help`` without its description, ``WIDTH`` columns wide."""
    bare = copy.copy(parser)
    bare.description = None
    bare.formatter_class = lambda prog: PlainTextHelpFormatter(prog, width=WIDTH)
    return bare.format_help().rstrip()


class CommandLineReference(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        parser = build_parser()
        (subcommands,) = (
            action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
        )
        result: list[nodes.Node] = [
            *self.parse_text_to_nodes(parser.description),
            nodes.literal_block(text=_usage_and_options(parser), language="text"),
        ]
        for name, subparser in subcommands.choices.items():
            section = nodes.section(ids=[nodes.make_id(f"psi-geoopt-{name}")])
            section += nodes.title(text=f"psi-geoopt {name}")
            section += self.parse_text_to_nodes(subparser.description)
            section += nodes.literal_block(text=_usage_and_options(subparser), language="text")
            result.append(section)
        return result


def setup(app: Sphinx) -> dict:
    app.add_directive("psi-geoopt-cli", CommandLineReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
