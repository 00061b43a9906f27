"""Sphinx configuration of the psi-geoopt documentation (built by ``bash scripts/docs.sh``).

The site is built and read without a network: MathJax is copied from an installed package
(``_ext/offline_mathjax.py``), the notebooks are executed at build time, the plots of a
``psi-geoopt verify --quick`` run are made at build time (``_ext/verify_run.py``) and the
command-line reference is generated from the argument parsers (``_ext/cli_reference.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import psi_geoopt  # noqa: E402

project = "psi-geoopt"
author = "the psi-geoopt authors"
copyright = "the psi-geoopt authors, MIT license"
release = version = psi_geoopt.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "myst_nb",
    "notebook_sources",
    "offline_mathjax",
    "verify_run",
    "cli_reference",
    "readme_links",
    "short_references",
]

root_doc = "index"
exclude_patterns = ["_build", "_generated", "notebooks/README.md", "**/.ipynb_checkpoints"]
nitpicky = True
nitpick_ignore_regex = [
    # Other projects' objects cannot be linked without fetching their inventories (the build
    # has no network): they are shown as code, unlinked.
    (
        r"py:.*",
        r"(builtins|contextlib|pathlib|collections|typing|torch|geoopt|numpy|numba|triton)\..*",
    ),
    (r"py:.*", r"(int|float|bool|str|bytes|dict|list|tuple|set|None|callable|optional|Any)"),
    (r"py:.*", r"(iterable|Optimizer)"),
    (r"py:.*", r"(Path|Tensor|Module|Iterable|Mapping|Sequence|Callable)"),
    # prose in numpy-style types ("dict name → dim")
    (r"py:class", r".*\s.*"),
    # module constants without a docstring, which autodoc does not document
    (r"py:data", r"([\w.]+\.)?[A-Z][A-Z0-9_]*"),
    # the fast-path kernels and private helpers are not part of the documented API
    (r"py:.*", r"psi_geoopt\.(numba_step|triton_step|optim\.kernels)(\..*)?|(.*\.)?_\w+(\..*)?"),
]

# ----------------------------------------------------------------------------- autodoc

autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True, "no-value": True}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# The examples in docstrings (``>>>``) run with ``sphinx-build -b doctest`` (scripts/docs.sh)
doctest_global_setup = "import torch, geoopt, psi_geoopt\nfrom psi_geoopt import *"

# ----------------------------------------------------------------------------- math

# relative to _static/, where offline_mathjax copies MathJax from the installed package
mathjax_path = "mathjax/tex-chtml.js"

# ----------------------------------------------------------------------------- MyST

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# Notebooks are committed without outputs and run on every build, so the figures on the site
# are those of the code being documented; a cell that raises fails the build.
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# ----------------------------------------------------------------------------- HTML

html_theme = "furo"
html_title = f"psi-geoopt {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
html_copy_source = False
