"""The shell commands of README.md and notebooks/README.md run as written after the quick
start, the README's synopses list every option of their sub-command, and its self-contained
Python examples run with the results their comments state.

Every command of a ``bash`` block is checked without running anything long and without the
network: sub-commands of ``psi-geoopt`` are parsed by the real parser, ``compare`` must not
need a package that the quick start does not install, files and folders named must exist.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from psi_geoopt import cli
from psi_geoopt.experiments import compare, models, optimizers

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
VENV_BIN = ".venv/bin/"


def _code_blocks(text: str, language: str) -> list[str]:
    """The contents of the fenced blocks of ``language`` in the Markdown ``text``."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def _bash_commands(text: str) -> list[list[str]]:
    """The commands of every ``bash`` block: continuation lines joined, split at ``&&``."""
    commands = []
    for block in _code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:end])
                words = words[end + 1 :]
    return commands


COMMANDS = _bash_commands(README) + _bash_commands((ROOT / "notebooks" / "README.md").read_text())
PYTHON_EXAMPLES = _code_blocks(README, "python")


def _installed_before(index: int) -> set[str]:
    """The packages that the commands before ``COMMANDS[index]`` install with pip, in the
    order a reader runs them."""
    installed = set()
    for words in COMMANDS[:index]:
        if words[:4] == [f"{VENV_BIN}python", "-m", "pip", "install"]:
            installed.update(words[4:])
    return installed


def _environment(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading ``NAME=value`` assignments and the command after them."""
    index = 0
    while index < len(words) and re.fullmatch(r"[A-Z_]+=\S*", words[index]):
        index += 1
    return dict(word.split("=", 1) for word in words[:index]), words[index:]


def test_the_readme_has_shell_commands():
    programs = {words[0] for words in COMMANDS}
    assert {"bash", f"{VENV_BIN}psi-geoopt", f"{VENV_BIN}python"} <= programs


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[shlex.join(w) for w in COMMANDS])
def test_command_runs_as_written_after_the_quick_start(index, monkeypatch):
    """A script of the repository, or a program of the quick start's environment (with what
    the README's earlier commands install)."""
    variables, words = _environment(COMMANDS[index])
    assert set(variables) <= {"TORCH_INDEX_URL", "TORCH_SPEC"}, variables
    program, *arguments = words
    if program == "bash":
        assert (ROOT / arguments[0]).is_file(), arguments
        return
    assert program.startswith(VENV_BIN), f"{program!r} is not on PATH after the quick start"
    name = program.removeprefix(VENV_BIN)
    if name == "psi-geoopt":
        # a torchvision:/timm: model is checked against the package where it is installed;
        # the README names it as a prerequisite of its command (a GPU machine's torch build)
        monkeypatch.setattr(compare, "check_model_name", _model_name_if_installed)
        args = cli.build_parser().parse_args(arguments)  # SystemExit on a bad option
        if args.command == "compare" and args.optimizers:
            needs = {
                o
                for o in args.optimizers
                if optimizers.OPTIMIZERS[o].requires
                and optimizers.OPTIMIZERS[o].requires not in _installed_before(index)
            }
            assert not needs, f"{needs} need a package the README has not installed before"
    elif name == "python" and arguments[0] != "-m":
        assert arguments[0].startswith("scripts/") and (ROOT / arguments[0]).is_file(), arguments
    elif name == "python":
        module, *rest = arguments[1:]
        assert module in {"pip", "pytest"}, arguments
        if module == "pip":
            assert rest[0] == "install" and all(re.fullmatch(r"[a-z]+", p) for p in rest[1:])
        else:
            for path in (word for word in rest if not word.startswith("-")):
                if not path.isdigit():
                    assert (ROOT / path.split("::")[0]).exists(), path
    elif name == "jupyter":
        assert arguments[0] == "lab" and (ROOT / arguments[1]).is_dir(), arguments
    else:
        pytest.fail(f"no check for {program!r}: add one here")


def _model_name_if_installed(name: str) -> str | None:
    zoo = name.partition(":")[0]
    if zoo in models.ZOOS and importlib.util.find_spec(zoo) is None:
        return None
    return models.check_model_name(name)


def test_the_entry_point_is_in_the_environment():
    """``.venv/bin/psi-geoopt`` exists next to this interpreter and answers ``--help``."""
    script = Path(sys.executable).parent / "psi-geoopt"
    if not script.exists():
        pytest.skip(f"psi-geoopt is not installed next to {sys.executable}")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for command in cli.COMMANDS:
        assert command in result.stdout


def _options(command: str) -> set[str]:
    parser = cli.build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    sub = subparsers.choices[command]
    return {o for action in sub._actions for o in action.option_strings if o.startswith("--")}


@pytest.mark.parametrize("command", ["demo", "verify", "bench"])
def test_synopsis_lists_every_option(command):
    """The README's ``psi-geoopt COMMAND [...]`` synopsis names each option of the parser."""
    (synopsis,) = re.findall(rf"`psi-geoopt {command}( \[[^`]*\])`", README)
    listed = set(re.findall(r"\[(--[a-z-]+)", synopsis))
    assert listed == _options(command) - {"--help"}


def test_the_conversion_example_finds_what_its_comment_says():
    """The first example of "Using it in your model" runs as written, and its comments hold."""
    block = next(b for b in PYTHON_EXAMPLES if "find_scale_invariant(model, batch)" in b)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(block, namespace)
    stated = re.search(r"find_scale_invariant\(model, batch\)\s+# (\{.*?\})", block).group(1)
    found = {
        name: p.manifold.dim
        for name, p in namespace["model"].named_parameters()
        if hasattr(p, "manifold")
    }
    assert repr(found) == stated
    assert len(namespace["optimizer"].param_groups) == 2


def test_the_product_manifold_example_keeps_row_norms_and_reaches_the_minimum():
    """The "PSI inside geoopt" example runs as written: every row keeps its norm and the loss
    reaches 5 x 0.1, as its last comment says."""
    block = next(b for b in PYTHON_EXAMPLES if "ProductManifold" in b)
    before = "optimizer = geoopt.optim.RiemannianSGD"
    assert before in block
    torch.manual_seed(0)
    namespace: dict = {}
    exec(block.replace(before, f"start = x.detach().clone()\n{before}"), namespace)
    rows, start = namespace["x"].detach()[:, :10], namespace["start"][:, :10]
    torch.testing.assert_close(rows.norm(dim=-1), start.norm(dim=-1), rtol=1e-6, atol=0)
    assert abs(namespace["loss"].item() - 5 * 0.1) < 1e-5
    assert "5 x 0.1" in block
