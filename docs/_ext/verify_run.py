"""A ``psi-geoopt verify --quick --plots DIR`` run, made when the site is built.

Its printed report and its figures go to ``_generated/verify/``, with ``run.md``, the page
fragment that shows them (included by ``theory.md``). A run whose checks fail is shown as it
is, with its exit status; a run that crashes fails the build.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging

COMMAND = ["verify", "--quick", "--threads", "1"]
OUTCOME = {
    0: "exit status 0: every check whose hypotheses hold passed and every negative control fired.",
    1: "**exit status 1: a check whose hypotheses hold failed or a negative control did not "
    "fire** (see the lines marked FAIL above).",
}

logger = logging.getLogger(__name__)


def _run(app: Sphinx) -> None:
    directory = Path(app.srcdir, "_generated", "verify")
    if app.builder.format != "html" and (directory / "run.md").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.png"):
        old.unlink()
    logger.info("running psi-geoopt %s --plots %s", " ".join(COMMAND), directory)
    result = subprocess.run(
        [sys.executable, "-m", "psi_geoopt", *COMMAND, "--plots", str(directory)],
        capture_output=True,
        text=True,
        cwd=Path(app.srcdir).parent,
        check=False,
    )
    if result.returncode not in OUTCOME:
        raise ExtensionError(f"psi-geoopt verify crashed ({result.returncode}):\n{result.stderr}")
    figures = sorted(directory.glob("*.png"))
    if not figures:
        raise ExtensionError(f"psi-geoopt verify --plots wrote no figure into {directory}")
    report = result.stdout.rstrip().replace(str(directory), "DIR")
    lines = [
        f"```text\n$ psi-geoopt {' '.join(COMMAND)} --plots DIR\n{report}\n```",
        "",
        OUTCOME[result.returncode],
        "",
    ]
    for figure in figures:
        lines += [f"![{figure.stem}]({figure.name})", ""]
    (directory / "run.md").write_text("\n".join(lines), encoding="utf-8")


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", _run)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
