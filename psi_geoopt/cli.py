"""The ``psi-geoopt`` command line: one sub-command per module, parsed here and run there.

Each sub-command module defines ``add_arguments(parser)`` and ``run(args) -> int``; the first
line of its docstring is the sub-command's help. A sub-command whose module needs a package of
the ``cli`` extra that is not installed is still listed, and running it says which package is
missing and how to install it. Docstrings and help strings are written in reStructuredText (the
documentation renders them); ``--help`` prints them as plain text.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap
import unicodedata
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


# LaTeX control words and their plain-text (Unicode) forms
_LATEX_SYMBOLS = {
    **dict(
        zip(
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho "
            "sigma tau upsilon phi chi psi omega".split(),
            "αβγδεζηθικλμνξπρστυφχψω",
            strict=True,
        )
    ),
    **dict(
        zip("Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega".split(), "ΓΔΘΛΞΠΣΦΨΩ", strict=True)
    ),
    "varepsilon": "ε", "varphi": "φ", "vartheta": "θ", "nabla": "∇", "partial": "∂",
    "langle": "⟨", "rangle": "⟩", "|": "‖", "lVert": "‖", "rVert": "‖", "Vert": "‖",
    "vert": "|", "le": "≤", "leq": "≤", "ge": "≥", "geq": "≥", "ll": "≪", "gg": "≫",
    "ne": "≠", "neq": "≠", "approx": "≈", "sim": "~", "propto": "∝", "equiv": "≡",
    "cdot": "·", "times": "×", "odot": "⊙", "circ": "∘", "pm": "±", "infty": "∞", "in": "∈",
    "setminus": "∖", "subset": "⊂", "perp": "⊥", "to": "→", "mapsto": "↦", "rightarrow": "→",
    "top": "T", "sum": "Σ", "prod": "Π", "ldots": "…", "cdots": "…", "dots": "…",
    "{": "{", "}": "}", "_": "_", "%": "%", "#": "#", "&": "&", "$": "$",
    ",": " ", ";": " ", ":": " ", " ": " ", "quad": "  ", "qquad": "  ", "!": "", "\\": " ",
    "left": "", "right": "", "big": "", "Big": "", "bigl": "", "bigr": "", "Bigl": "",
    "Bigr": "", "displaystyle": "",
}  # fmt: skip
# control words whose one argument is shown as it is, with a mark, or through a table
_LATEX_ARGUMENT_MACROS = {
    "operatorname": "{}", "mathrm": "{}", "text": "{}", "textrm": "{}", "mathit": "{}",
    "mathbf": "{}", "boldsymbol": "{}", "mathcal": "{}", "mathsf": "{}", "hat": "{}\u0302",
    "widehat": "{}\u0302", "bar": "{}\u0304", "overline": "{}\u0304", "tilde": "{}\u0303",
    "vec": "{}\u20d7", "dot": "{}\u0307",
}  # fmt: skip
_BLACKBOARD = {"R": "ℝ", "N": "ℕ", "Z": "ℤ", "Q": "ℚ", "C": "ℂ", "E": "𝔼", "P": "ℙ"}
_SUPERSCRIPTS = dict(zip("0123456789+-=()abdeikmntxT", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ᵃᵇᵈᵉⁱᵏᵐⁿᵗˣᵀ", strict=True))
_SUBSCRIPTS = dict(
    zip("0123456789+-=()aeoxhklmnpstij", "₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎ₐₑₒₓₕₖₗₘₙₚₛₜᵢⱼ", strict=True)
)
_ROLE = re.compile(r":(?:[a-z]+:)?([a-z]+):`([^`]*)`")
_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)


def _latex_argument(tex: str, start: int) -> tuple[str, int]:
    """The argument of a macro, ``^`` or ``_`` at ``tex[start:]`` (a braced group, a control
    word or one character) as plain text, and the index after it."""
    while start < len(tex) and tex[start] == " ":
        start += 1
    if start >= len(tex):
        return "", start
    if tex[start] == "{":
        depth, end = 1, start + 1
        while end < len(tex) and depth:
            depth += {"{": 1, "}": -1}.get(tex[end], 0)
            end += 1
        return latex_to_text(tex[start + 1 : end - 1]), end
    if tex[start] == "\\":
        word = re.match(r"\\([a-zA-Z]+|.)", tex[start:])
        return latex_to_text(word.group(0)), start + len(word.group(0))
    return tex[start], start + 1


# what needs no parentheses as a fraction's term or a script: a number, a name with its
# accents and scripts, a bracketed expression
_ATOM = re.compile(r"\d+(\.\d+)?|[^\W\d_][\w\u0300-\u036f]*|⟨[^⟨⟩]*⟩|\([^()]*\)|‖[^‖]*‖|.")


def _parenthesized(text: str) -> str:
    return text if _ATOM.fullmatch(text) else f"({text})"


def _script(text: str, table: dict[str, str], mark: str) -> str:
    if text and all(char in table for char in text):
        return "".join(table[char] for char in text)
    return mark + _parenthesized(text)


def latex_to_text(tex: str) -> str:
    r"""Render the LaTeX of a formula as plain Unicode text.

    Greek letters and operators become their Unicode characters, ``\frac{a}{b}`` becomes
    ``a/b``, ``\sqrt{x}`` becomes ``√x``, simple sub- and superscripts become Unicode sub- and
    superscripts; unknown control words lose their backslash.

    >>> latex_to_text(r"\eta_T = \frac1L\sqrt{T_0/T}, \|w\|^2 \ge 10^{-5}")
    'η_T = 1/L√(T₀/T), ‖w‖² ≥ 10⁻⁵'
    """
    out, i = [], 0
    while i < len(tex):
        char = tex[i]
        if char == "\\":
            word = re.match(r"\\([a-zA-Z]+|.)", tex[i:]).group(1)
            i += len(word) + 1
            if word == "frac":
                numerator, i = _latex_argument(tex, i)
                denominator, i = _latex_argument(tex, i)
                out.append(f"{_parenthesized(numerator)}/{_parenthesized(denominator)}")
            elif word == "sqrt":
                radicand, i = _latex_argument(tex, i)
                out.append("√" + _parenthesized(radicand))
            elif word == "mathbb":
                letter, i = _latex_argument(tex, i)
                out.append(_BLACKBOARD.get(letter, letter))
            elif word in _LATEX_ARGUMENT_MACROS:
                argument, i = _latex_argument(tex, i)
                out.append(_LATEX_ARGUMENT_MACROS[word].format(argument))
            else:
                out.append(_LATEX_SYMBOLS.get(word, word))
        elif char in "^_":
            argument, i = _latex_argument(tex, i + 1)
            table = _SUPERSCRIPTS if char == "^" else _SUBSCRIPTS
            out.append(_script(argument, table, char))
        elif char in "{}":
            i += 1
        else:
            out.append(char)
            i += 1
    return unicodedata.normalize("NFC", re.sub(r"(?<=[⟨(]) +| +(?=[⟩)])", "", "".join(out)))


def _role_to_text(match: re.Match) -> str:
    role, content = match.groups()
    if role == "math":
        return latex_to_text(content)
    title = re.fullmatch(r"(.*?)\s*<[^>]*>", content, re.DOTALL)
    if title:
        return title.group(1)
    if content.startswith("~"):
        return content.rpartition(".")[2]
    return content.lstrip("!")


def rst_to_text(text: str) -> str:
    r"""Render the reStructuredText of a docstring or help string as plain text.

    Roles (``:math:`` through :func:`latex_to_text`, ``:func:``, ``:class:``, ``:mod:``, ...)
    become their text, double back-quoted literals lose their quotes, ``.. math::`` blocks are
    rendered as indented formulas and a paragraph ending in ``::`` ends in ``:``.

    >>> rst_to_text(r"the rate :math:`O(1/\sqrt T)` of :func:`~psi_geoopt.to_psi` (``dim=0``)::")
    'the rate O(1/√T) of to_psi (dim=0):'
    """
    lines, in_math = [], False
    for line in text.splitlines():
        if re.fullmatch(r"\s*\.\. math::\s*", line):
            in_math = True
            continue
        if in_math and line.strip() and not line.startswith((" ", "\t")):
            in_math = False
        lines.append(("    " + latex_to_text(line.strip())) if in_math and line.strip() else line)
    text = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", "\n".join(lines))
    text = _ROLE.sub(_role_to_text, text)
    text = _LITERAL.sub(r"\1", text)
    return re.sub(r"(?<=\S)::$", ":", text, flags=re.MULTILINE)


def _fill_paragraphs(text: str, width: int, indent: str) -> str:
    """Wrap each paragraph and each "- " list item of ``text`` to ``width``; indented blocks
    (formulas, code) keep their lines."""
    blocks = []
    for paragraph in re.split(r"\n\s*\n", text.strip("\n")):
        if paragraph.startswith((" ", "\t")):
            blocks.append("\n".join(indent + line for line in paragraph.splitlines()))
            continue
        items = re.split(r"\n(?=- )", paragraph)
        blocks.append(
            "\n".join(
                textwrap.fill(
                    " ".join(item.split()),
                    width,
                    initial_indent=indent,
                    subsequent_indent=indent + ("  " if item.startswith("- ") else ""),
                )
                for item in items
            )
        )
    return "\n\n".join(blocks)


class PlainTextHelpFormatter(argparse.HelpFormatter):
    """Prints the reStructuredText of descriptions and help strings as plain text (see
    :func:`rst_to_text`), paragraphs and list items wrapped to the terminal's width."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return _fill_paragraphs(rst_to_text(text), width, indent)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_string = super()._get_help_string(action)
        return None if help_string is None else rst_to_text(help_string)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psi-geoopt",
        description="Train batch-normalized networks on the PSI manifold: demo, optimizer "
        "comparisons, convergence-bound checks and benchmarks.",
        formatter_class=PlainTextHelpFormatter,
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
            formatter_class=PlainTextHelpFormatter,
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
