"""Links of the Markdown files that pages include from outside docs/ (README.md,
theory/README.md, benchmarks/RESULTS.md, notebooks/README.md, generated fragments).

Such a file links relative to its own folder, for GitHub; included into a page, its links are
rewritten to point from the page: to the page that shows the linked file (``PAGES``), to the
page that holds a section of README.md (``ANCHORS``), or to the same file seen from the page.
A link to anything else outside docs/ stays unresolved and fails the build.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sphinx.application import Sphinx

PAGES = {
    "README.md": "index.md",
    "theory/README.md": "theory.md",
    "benchmarks/RESULTS.md": "performance.md",
    "notebooks/README.md": "notebooks.md",
}
ANCHORS = {
    "README.md#the-demo": "cli.md#the-demo",
    "README.md#psi-inside-geoopt": "user-guide.md#psi-inside-geoopt",
    "README.md#performance": "performance.md",
    "README.md#documentation": "development.md#this-documentation",
}
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def rewrite_links(text: str, included: Path, page_directory: Path, srcdir: Path) -> str:
    """``text`` of the file ``included`` with its relative links made relative to the folder
    ``page_directory`` of the page that includes it."""
    root = srcdir.parent

    def target(match: re.Match) -> str:
        link = match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # a URL (https:, mailto:, ...)
            return match.group(0)
        path, _, anchor = link.partition("#")
        file = Path(os.path.normpath(included.parent / path)) if path else included
        name = file.relative_to(root).as_posix() if file.is_relative_to(root) else str(file)
        if f"{name}#{anchor}" in ANCHORS:
            page, _, anchor = ANCHORS[f"{name}#{anchor}"].partition("#")
            file = srcdir / page
        elif name in PAGES:
            file = srcdir / PAGES[name]
        new = Path(os.path.relpath(file, page_directory)).as_posix() + (
            f"#{anchor}" if anchor else ""
        )
        return match.group(1) + new + match.group(3)

    return LINK.sub(target, text)


def _include_read(app: Sphinx, relative_path: Path, parent_docname: str, content: list) -> None:
    srcdir = Path(app.srcdir)
    included = Path(os.path.normpath(srcdir / relative_path))
    page_directory = (srcdir / parent_docname).parent
    content[0] = rewrite_links(content[0], included, page_directory, srcdir)


def setup(app: Sphinx) -> dict:
    app.connect("include-read", _include_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
