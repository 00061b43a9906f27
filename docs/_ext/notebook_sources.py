"""The notebooks of ``notebooks/`` as pages of the site.

Sphinx reads pages only from inside ``docs/`` (and resolves a symbolic link to where it
points, which breaks the links between pages), so the notebooks and their README are copied
into ``docs/notebooks/`` (not tracked by git) every time the site is built, before Sphinx
looks for its pages. Edit them in ``notebooks/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config

SOURCE = "notebooks"
PATTERNS = ("*.ipynb", "README.md")


def _copy(app: Sphinx, config: Config) -> None:
    source = Path(app.confdir).parent / SOURCE
    target = Path(app.srcdir) / SOURCE
    if target.is_dir():
        shutil.rmtree(target)
    target.mkdir()
    for pattern in PATTERNS:
        for path in sorted(source.glob(pattern)):
            shutil.copy2(path, target / path.name)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
