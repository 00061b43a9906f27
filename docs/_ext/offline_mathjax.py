"""MathJax 3 for a site read without a network: copied from the installed package
``django-static-mathjax`` (MathJax's own ES5 build) into the site's ``_static/mathjax``.

Set ``mathjax_path = "mathjax/tex-chtml.js"`` in conf.py. Only the CommonHTML output and the
parts it loads on demand (TeX extensions, fonts, menu, accessibility) are copied.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util.fileutil import copy_asset

DISTRIBUTION = "django-static-mathjax"
PARTS = ("tex-chtml.js", "a11y", "adaptors", "input", "output/chtml", "sre", "ui")


def mathjax_directory() -> Path:
    """The ``es5`` directory of the installed MathJax."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ExtensionError(
            f"MathJax is not installed: pip install -e '.[docs]' (it brings {DISTRIBUTION})"
        ) from None
    directory = Path(distribution.locate_file("mathjax/static/mathjax/es5"))
    if not (directory / "tex-chtml.js").is_file():
        raise ExtensionError(f"{DISTRIBUTION} has no MathJax ES5 build in {directory}")
    return directory


def _check(app: Sphinx) -> None:
    if app.config.mathjax_path != "mathjax/tex-chtml.js":
        raise ExtensionError("offline_mathjax needs mathjax_path = 'mathjax/tex-chtml.js'")
    mathjax_directory()


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source, target = mathjax_directory(), Path(app.outdir, "_static", "mathjax")
    for part in PARTS:
        copy_asset(source / part, target / part if (source / part).is_dir() else target)


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", _check)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
