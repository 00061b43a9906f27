"""The browser check of the documentation site (``scripts/check_docs.py``) catches what it claims.

A small site written here, with one fault of each kind next to pages without faults, goes
through the real check in the system's Chromium, with formulas typeset by the MathJax copy the
site ships. Skipped where Chromium or Playwright is missing, except in CI (``CI`` set): there
``.ci/run`` installs both, and a skip would hide the check.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _missing(what: str) -> None:
    message = f"{what} is needed for the browser check of the documentation"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; .ci/run installs it")
    pytest.skip(message)


@pytest.fixture(scope="module")
def check_docs():
    if importlib.util.find_spec("playwright") is None:
        _missing("playwright (pip install -e '.[docs]')")
    module = _load("check_docs", ROOT / "scripts" / "check_docs.py")
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser")):
        _missing("Chromium (apt-get install chromium)")
    return module


def _page(body: str, head: str = "") -> str:
    return f"<!DOCTYPE html><html><head>{head}</head><body><article>{body}</article></body></html>"


MATHJAX = (
    '<script>window.MathJax = {tex: {inlineMath: [["\\\\(", "\\\\)"]]}}</script>'
    '<script defer src="_static/mathjax/tex-chtml.js"></script>'
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A site with every kind of fault on index.html, notebooks/01_bare.html and
    math-error.html, and none on the other pages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mathjax = _load("offline_mathjax", ROOT / "docs" / "_ext" / "offline_mathjax.py")
    root = tmp_path_factory.mktemp("site")
    for part in mathjax.PARTS:
        source, target = mathjax.mathjax_directory() / part, root / "_static" / "mathjax" / part
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    figure = plt.figure(figsize=(1, 1))
    figure.savefig(root / "figure.png")
    plt.close(figure)
    (root / "notebooks").mkdir()
    pages = {
        "index.html": _page(
            r"<p id='top'>Raw \frac{a}{b}, $$x$$ and :math:`x` here.</p>"
            r"<pre>\frac in a code block is fine</pre>"
            r"<p style='display:none'>\langle hidden is fine</p>"
            "<a href='good.html#yes'>fine</a> <a href='good.html#nope'>bad anchor</a>"
            "<a href='missing.html'>missing page</a> <a href='https://example.org/'>fine</a>"
            "<img src='missing.png'>",
            head="<script src='https://cdn.example.org/mathjax.js'></script>",
        ),
        "good.html": _page(
            r"<p id='yes'>Nothing wrong.</p><pre>\frac</pre><a href='index.html#top'>back</a>"
            "<a href='notebooks/02_figure.html'>a notebook</a><a href='figure.png'>a file</a>"
        ),
        "math.html": _page(
            r"<p><span class='math'>\(\frac{a}{b} + \langle u, v \rangle\)</span>"
        ).replace("<head>", "<head>" + MATHJAX),
        "math-error.html": _page(r"<p><span class='math'>\(\frac{a}\)</span></p>").replace(
            "<head>", "<head>" + MATHJAX
        ),
        "notebooks/01_bare.html": _page("<p>A notebook that was not executed.</p>"),
        "notebooks/02_figure.html": _page(
            "<div class='cell_output'><img src='../figure.png'></div>"
        ),
    }
    for name, html in pages.items():
        (root / name).write_text(html, encoding="utf-8")
    return root


def test_every_fault_is_reported_and_nothing_else(check_docs, site, capsys):
    assert check_docs.main([str(site)]) == 1
    output = capsys.readouterr().out
    failures = [line.removeprefix("FAIL ") for line in output.splitlines() if line[:5] == "FAIL "]
    by_page: dict[str, list[str]] = {}
    for failure in failures:
        page, _, message = failure.partition(": ")
        by_page.setdefault(page, []).append(message)
    assert set(by_page) == {"index.html", "notebooks/01_bare.html", "math-error.html"}, output
    index = "\n".join(by_page["index.html"])
    assert "loads https://cdn.example.org/mathjax.js from the network" in index
    assert "raw markup '\\\\frac'" in index
    assert "raw markup '$$'" in index
    assert "raw markup ':math:`'" in index
    assert "langle" not in index  # hidden text is not checked
    assert "link to a missing anchor: " in index and index.count("good.html#nope") == 1
    assert "link to a missing file: " in index and "missing.html" in index
    assert "image not loaded" in index and "missing.png" in index
    assert by_page["notebooks/01_bare.html"] == [
        "a notebook page without figures (was it executed?)"
    ]
    assert any("MathJax could not typeset" in m for m in by_page["math-error.html"])
    assert "math.html: 1 formulas" in output  # typeset offline from the shipped MathJax


def test_a_site_that_is_not_there(check_docs, tmp_path, capsys):
    assert check_docs.main([str(tmp_path)]) == 2
    assert "build it with bash scripts/docs.sh" in capsys.readouterr().out
