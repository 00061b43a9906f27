"""Open every page of the built documentation site in headless Chromium and check what a
reader sees.

Usage: python scripts/check_docs.py [SITE] [--chromium PATH]

SITE is the folder ``bash scripts/docs.sh`` built (default: docs/_build/html). The browser is
the system's Chromium (``apt-get install chromium``; ``--chromium`` or ``$CHROMIUM`` for
another path), driven by Playwright (the ``docs`` extra); no browser is downloaded. Each page
is loaded from disk with every request that is not a local file blocked, and checked for:

- network: the page requests nothing but local files (no CDN), and every file it asks for
  exists (no failed request) and its scripts raise no error;
- formulas: MathJax has typeset the page (pages with ``math`` have ``mjx-container``
  elements, and the API and theory pages have math), no formula is a MathJax error, and the
  visible text outside code blocks holds no raw TeX or reStructuredText (a backslash command
  such as ``\\frac`` or ``\\langle``, ``$$``, ``:math:``, ``:func:``, ...);
- notebooks: each notebook page shows figures, and every image loaded (``naturalWidth > 0``);
- links: every link to a local file points to a file that exists, and its ``#anchor`` to an
  element of that page.

Prints one line per page and the failures; the exit status is 1 if anything failed, 2 if
the browser cannot be started.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_SCHEMES = {"file", "data", "blob", "about"}
# pages that must contain typeset math
MATH_PAGES = ("api/manifold.html", "api/optim.html", "api/theory.html", "theory.html")
NOTEBOOK_PAGES = "notebooks/*.html"

# What a page shows: its visible text outside code blocks and typeset formulas, the ids it
# defines, its links and images, and what MathJax made of its formulas.
INSPECT_PAGE = r"""
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const skip = "pre, code, script, style, mjx-container, mjx-assistive-mml, .MathJax, "
             + "textarea, template, noscript";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const text = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(skip) || !parent.checkVisibility()) continue;
    text.push(node.textContent);
  }
  const main = document.querySelector("article") || document.body;
  return {
    text: text.join(" "),
    ids: Array.from(document.querySelectorAll("[id], a[name]"), e => e.id || e.name),
    links: Array.from(document.querySelectorAll("a[href]"), a => a.href),
    resources: Array.from(
      document.querySelectorAll("script[src], link[href], img[src], iframe[src], source[src]"),
      e => e.src || e.href),
    images: Array.from(main.querySelectorAll("img"), img => ({
      src: img.currentSrc || img.src, loaded: img.complete && img.naturalWidth > 0})),
    outputImages: main.querySelectorAll(".cell_output img, .output img").length,
    mathSource: document.querySelectorAll(".math, span.math, div.math").length,
    typeset: document.querySelectorAll("mjx-container").length,
    mathErrors: Array.from(document.querySelectorAll("mjx-merror"),
                           e => e.getAttribute("data-mjx-error") || e.textContent),
  };
}
"""
RAW_MARKUP = (
    r"\\[A-Za-z]+",  # a TeX command: \frac, \langle, \operatorname, ...
    r"\$\$",
    r":(math|func|class|meth|mod|attr|data|obj|ref|doc):`",
    r"``",
)


def find_chromium(path: str | None) -> str:
    candidates = [path, os.environ.get("CHROMIUM"), "chromium", "chromium-browser"]
    for candidate in filter(None, candidates):
        found = shutil.which(candidate)
        if found:
            return found
    sys.exit(
        "check_docs: no Chromium found; install the system's (apt-get install chromium) or "
        "pass --chromium PATH"
    )


class Site:
    """The pages of a built site and what the browser found on each."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.pages = sorted(
            p for p in self.root.rglob("*.html") if "_static" not in p.relative_to(self.root).parts
        )
        self.ids: dict[Path, set[str]] = {}
        self.failures: list[str] = []

    def fail(self, page: Path, message: str) -> None:
        self.failures.append(f"{page.relative_to(self.root)}: {message}")

    def local_path(self, url: str) -> tuple[Path, str] | None:
        """The file and anchor of a ``file:`` URL, ``None`` for any other URL."""
        address, fragment = urldefrag(url)
        parsed = urlparse(address)
        if parsed.scheme != "file":
            return None
        path = Path(unquote(parsed.path))
        return (path / "index.html" if path.is_dir() else path), unquote(fragment)

    def check_page(self, page: Path, seen: dict) -> None:
        relative = page.relative_to(self.root).as_posix()
        self.ids[page] = set(seen["ids"])
        for url in seen["resources"]:
            if urlparse(url).scheme not in LOCAL_SCHEMES:
                self.fail(page, f"loads {url} from the network")
        if seen["mathErrors"]:
            self.fail(page, f"MathJax could not typeset: {seen['mathErrors'][:3]}")
        if (seen["mathSource"] or relative in MATH_PAGES) and not seen["typeset"]:
            self.fail(page, "its formulas were not typeset by MathJax")
        for pattern in RAW_MARKUP:
            for match in list(re.finditer(pattern, seen["text"]))[:3]:
                context = seen["text"][max(0, match.start() - 40) : match.end() + 40]
                self.fail(page, f"raw markup {match.group(0)!r} in the visible text: …{context}…")
        if Path(relative).match(NOTEBOOK_PAGES):
            if not seen["outputImages"]:
                self.fail(page, "a notebook page without figures (was it executed?)")
        for image in seen["images"]:
            if not image["loaded"]:
                self.fail(page, f"image not loaded: {image['src']}")

    def check_links(self, links: dict[Path, list[str]]) -> int:
        count = 0
        for page, urls in links.items():
            for url in urls:
                target = self.local_path(url)
                if target is None:
                    continue
                count += 1
                path, anchor = target
                if not path.exists():
                    self.fail(page, f"link to a missing file: {url}")
                elif anchor and path.suffix == ".html":
                    if path not in self.ids:
                        self.fail(page, f"link into a page that was not checked: {url}")
                    elif anchor not in self.ids[path]:
                        self.fail(page, f"link to a missing anchor: {url}")
        return count


def check(site: Site, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    links: dict[Path, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="check-docs-") as profile, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        browser.route(
            "**/*",
            lambda route: (
                route.continue_()
                if urlparse(route.request.url).scheme in LOCAL_SCHEMES
                else route.abort("blockedbyclient")
            ),
        )
        for page_path in site.pages:
            start = time.perf_counter()
            tab = browser.new_page()
            problems: list[str] = []
            tab.on(
                "requestfailed",
                lambda request, problems=problems: problems.append(
                    f"request failed ({request.failure}): {request.url}"
                ),
            )
            tab.on(
                "pageerror",
                lambda error, problems=problems: problems.append(f"script error: {error}"),
            )
            tab.goto(page_path.as_uri(), wait_until="load")
            seen = tab.evaluate(INSPECT_PAGE)
            tab.close()
            for problem in problems:
                site.fail(page_path, problem)
            site.check_page(page_path, seen)
            links[page_path] = seen["links"]
            print(
                f"{page_path.relative_to(site.root)}: {seen['typeset']} formulas, "
                f"{len(seen['images'])} images, {len(seen['links'])} links "
                f"({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
        browser.close()
    count = site.check_links(links)
    print(f"{count} local links checked")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", type=Path, default=Path("docs/_build/html"))
    parser.add_argument("--chromium", help="the Chromium executable (default: from PATH)")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"check_docs: no site in {args.site}; build it with bash scripts/docs.sh")
        return 2
    chromium = find_chromium(args.chromium)
    site = Site(args.site)
    try:
        check(site, chromium)
    except Exception as error:  # the browser did not start or crashed
        print(f"check_docs: the browser failed: {error}")
        return 2
    for failure in site.failures:
        print("FAIL", failure)
    print(
        f"{len(site.pages)} pages checked in Chromium: "
        + (f"{len(site.failures)} failures" if site.failures else "all checks passed")
    )
    return 1 if site.failures else 0


if __name__ == "__main__":
    sys.exit(main())
