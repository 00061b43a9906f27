"""Tests of the ``psi-geoopt`` command line: demo and compare, their outputs and bad input."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest
from conftest import write_cifar, write_image_folder, write_mnist

from psi_geoopt import cli
from psi_geoopt.experiments import compare, demo, optimizers

RUN_FIELDS = {
    "model", "dataset", "optimizer", "lr", "init_scale", "seed", "final_train_loss",
    "test_accuracy", "train_mode_accuracy", "train_accuracy", "steps_to_target", "wall_s",
    "loss_curve",
}  # fmt: skip
FIELD_TYPES = {
    "model": str, "dataset": str, "optimizer": str, "lr": float, "init_scale": float,
    "seed": int, "steps": int, "batch_size": int, "target_loss": float,
    "final_train_loss": (float, type(None)), "test_accuracy": float,
    "train_mode_accuracy": float, "train_accuracy": float,
    "steps_to_target": (int, type(None)), "wall_s": float, "loss_curve": list,
    "log_every": int, "diverged": bool,
    "initialization": str, "channel_factors": dict,  # demo
    "images_per_s": (float, type(None)),
    "lr_factor": (float, type(None)),  # compare
    "epochs": (int, type(None)), "schedule": str, "warmup_epochs": float, "augment": str,
    "precision": str, "cifar_stem": bool, "image_size": (int, type(None)), "device": str,
}  # fmt: skip
"""One type per field of results.json, in every record of demo and compare."""


def _check_field_types(runs: list[dict]) -> None:
    for run in runs:
        for field, value in run.items():
            assert field in FIELD_TYPES, field
            assert isinstance(value, FIELD_TYPES[field]), (field, value)
            if field in ("lr", "init_scale", "target_loss"):
                assert not isinstance(value, bool)
        assert all(isinstance(loss, float) for loss in run["loss_curve"])
        for factors in run.get("channel_factors", {}).values():
            assert all(isinstance(factor, float) for factor in factors)


def _main(argv: list[str]) -> int:
    """Parse and run one sub-command the way :func:`psi_geoopt.cli.main` does, with only the
    sub-command under test registered (the others are separate modules)."""
    modules = {"demo": demo, "compare": compare}
    parser = argparse.ArgumentParser(prog="psi-geoopt")
    subparsers = parser.add_subparsers(dest="command", required=True)
    module = modules[argv[0]]
    module.add_arguments(subparsers.add_parser(argv[0]))
    return module.run(parser.parse_args(argv))


def _runs(directory: Path) -> list[dict]:
    return json.loads((directory / "results.json").read_text())["runs"]


def _without_timing(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in run.items() if k not in ("wall_s", "images_per_s")} for run in runs]


def test_help_lists_every_sub_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    for command in ("demo", "compare", "verify", "bench"):
        assert command in output


# ------------------------------------------------------------------------------------- demo


def test_demo_writes_results_and_is_deterministic(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert _main(["demo", "--out", str(first), "--steps", "20", "--seed", "3"]) == 0
    output = capsys.readouterr().out
    assert "final train loss" in output and "psi-sgd" in output and "sgd" in output
    assert "loss curves differ by at most" in output
    runs = _runs(first)
    assert [(r["optimizer"], r["initialization"]) for r in runs] == [
        ("psi-sgd", "same"), ("psi-sgd", "rescaled"), ("sgd", "same"), ("sgd", "rescaled"),
    ]  # fmt: skip
    for run in runs:
        assert RUN_FIELDS <= run.keys()
        assert len(run["loss_curve"]) == 2
    factors = {name: c.tolist() for name, c in demo.channel_factors(3, 64).items()}
    assert [r["init_scale"] for r in runs] == [1.0] * 4
    assert [r["channel_factors"] for r in runs] == [{}, factors, {}, factors]
    _check_field_types(runs)
    assert (first / "loss_curves.png").stat().st_size > 1000
    assert _main(["demo", "--out", str(second), "--steps", "20", "--seed", "3"]) == 0
    assert _without_timing(_runs(second)) == _without_timing(runs)


def test_short_demo_logs_its_last_window(tmp_path, capsys):
    """Fewer steps than one logging window: the partial window is logged, the reading is a
    number and the plot has its points."""
    assert _main(["demo", "--out", str(tmp_path), "--steps", "5"]) == 0
    output = capsys.readouterr().out
    assert "nan" not in output
    assert "loss curves differ by at most" in output
    runs = _runs(tmp_path)
    for run in runs:
        assert len(run["loss_curve"]) == 1 and run["steps"] == 5
    _check_field_types(runs)
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000


def test_demo_rescaling_factors_are_per_channel_in_range():
    factors = demo.channel_factors(seed=0, batch_size=64)
    assert len(factors) == 3
    values = [value for vector in factors.values() for value in vector.tolist()]
    assert len(values) == 16 + 32 + 32
    assert all(1.0 <= v <= 10.0 for v in values)
    assert max(values) / min(values) > 5


# ---------------------------------------------------------------------------------- compare

TINY = [
    "--optimizers", "psi-sgd", "sgd", "--lr-factors", "1", "--init-scales", "1", "3",
    "--seeds", "2", "--steps", "10",
]  # fmt: skip


def test_compare_writes_runs_summary_and_figures(tmp_path):
    out = tmp_path / "out"
    assert _main(["compare", *TINY, "--out", str(out)]) == 0
    runs = _runs(out)
    assert len(runs) == 2 * 2 * 2
    for run in runs:
        assert RUN_FIELDS <= run.keys()
        assert run["model"] == "mlp-bn" and run["dataset"] == "digits"
    _check_field_types(runs)
    assert {(r["optimizer"], r["init_scale"], r["seed"]) for r in runs} == {
        (o, s, seed) for o in ("psi-sgd", "sgd") for s in (1.0, 3.0) for seed in (0, 1)
    }
    summary = (out / "summary.md").read_text()
    assert "| psi-sgd |" in summary and "| sgd |" in summary and "±" in summary
    for figure in ("heatmap-mlp-bn-digits.png", "loss-curves-mlp-bn-digits.png"):
        assert (out / figure).stat().st_size > 1000


def test_compare_resumes_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert _main(["compare", *TINY, "--out", str(out)]) == 0
    before = _runs(out)
    assert _main(["compare", *TINY, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(compare, "execute", lambda *a: pytest.fail("nothing left to run"))
    assert _main(["compare", *TINY, "--out", str(out), "--resume"]) == 0
    assert _runs(out) == before


def test_compare_resumes_results_written_before_the_recipe_fields(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _main(["compare", *TINY, "--out", str(out)]) == 0
    recipe_fields = ("epochs", "schedule", "warmup_epochs", "augment", "precision", "cifar_stem")
    older = [
        {k: v for k, v in run.items() if k not in (*recipe_fields, "image_size", "device")}
        for run in _runs(out)
    ]
    (out / "results.json").write_text(json.dumps({"runs": older}))
    monkeypatch.setattr(compare, "execute", lambda *a: pytest.fail("nothing left to run"))
    assert _main(["compare", *TINY, "--out", str(out), "--resume"]) == 0
    assert _runs(out) == older


def _interrupted_at(call: int):
    """``compare.execute``, with Ctrl-C (KeyboardInterrupt) at its ``call``-th call."""
    execute = compare.execute
    calls = []

    def interrupting(spec, runtime):
        calls.append(spec)
        if len(calls) == call:
            raise KeyboardInterrupt
        return execute(spec, runtime)

    return interrupting


def test_compare_interrupted_leaves_valid_partial_results(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    execute = compare.execute
    monkeypatch.setattr(compare, "execute", _interrupted_at(3))
    assert _main(["compare", *TINY, "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert "interrupted after" in captured.out and "finished after" not in captured.out
    assert "holds 2 finished runs;" in captured.err
    partial = _runs(out)
    assert len(partial) == 2
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(compare, "execute", execute)
    assert _main(["compare", *TINY, "--out", str(out), "--resume"]) == 0
    complete = _runs(out)
    assert len(complete) == 8 and complete[:2] == partial
    fresh = tmp_path / "fresh"
    assert _main(["compare", *TINY, "--out", str(fresh)]) == 0
    key = compare.RunSpec.from_record
    assert sorted(_without_timing(complete), key=lambda r: str(key(r))) == sorted(
        _without_timing(_runs(fresh)), key=lambda r: str(key(r))
    )


def test_compare_interrupted_after_one_run_says_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "execute", _interrupted_at(2))
    assert _main(["compare", *TINY, "--out", str(tmp_path)]) == 130
    assert "holds 1 finished run;" in capsys.readouterr().err


def test_compare_updates_only_its_markdown_section(tmp_path):
    markdown = tmp_path / "docs" / "RESULTS.md"
    markdown.parent.mkdir()
    markdown.write_text("# Results\n\n## Performance\nkept\n\n## Digits comparison\nold\n")
    out = tmp_path / "out"
    argv = ["compare", *TINY, "--title", "Digits comparison", "--out", str(out)]
    assert _main([*argv, "--update-markdown", str(markdown)]) == 0
    text = markdown.read_text()
    assert text.startswith("# Results\n\n## Performance\nkept\n\n## Digits comparison\n")
    assert "old" not in text and "| psi-sgd |" in text
    image = "digits-comparison-heatmap-mlp-bn-digits.png"
    assert f"]({image})" in text and (markdown.parent / image).exists()
    assert "--update-markdown" in text  # the regenerating command


def test_compare_without_the_adamp_package(tmp_path, monkeypatch, capsys):
    """Asked for by name: an error before training; in the default list: left out, with a note."""
    monkeypatch.setattr(optimizers, "is_installed", lambda package: package != "adamp")
    execute = compare.execute
    monkeypatch.setattr(compare, "execute", lambda *a: pytest.fail("training started"))
    assert _main(["compare", "--optimizers", "sgd", "sgdp", "--out", str(tmp_path / "a")]) == 2
    assert "sgdp need(s) the package(s) adamp (pip install adamp)" in capsys.readouterr().err
    monkeypatch.setattr(compare, "execute", execute)
    grid = ["--lr-factors", "1", "--init-scales", "1", "--seeds", "1", "--steps", "2"]
    assert _main(["compare", *grid, "--out", str(tmp_path / "b")]) == 0
    assert "leaving out sgdp, adamp" in capsys.readouterr().err
    used = [run["optimizer"] for run in _runs(tmp_path / "b")]
    assert used == [name for name in optimizers.OPTIMIZERS if name not in ("sgdp", "adamp")]
    with pytest.raises(ImportError, match="pip install adamp"):
        optimizers.build_optimizer("adamp", None, {}, None, 0.1)


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--optimizers", "lamb"], "psi-sgd-momentum"),
        (["compare", "--models", "vgg"], "preact-resnet"),
        (["compare", "--datasets", "imagenet"], "fashion-mnist"),
        (["compare", "--models", "keras:resnet"], "torchvision:NAME, timm:NAME"),
        (["compare", "--epochs", "3", "--steps", "10"], "not allowed with"),
        (["compare", "--warmup-epochs", "-1"], "non-negative"),
        (["compare", "--schedule", "linear"], "cosine"),
        (["compare", "--precision", "fp8"], "bf16"),
        (["compare", "--workers", "-2"], "non-negative"),
        (["compare", "--lrs", "-0.1"], "positive"),
        (["compare", "--lr-factors", "0"], "positive"),
        (["compare", "--lrs", "0.1", "--lr-factors", "1"], "not allowed with"),
        (["compare", "--seeds", "0"], "positive integer"),
        (["compare", "--init-scales", "1", "-2"], "positive"),
        (["compare", "--init-scales", "nan"], "positive"),
        (["compare", "--steps", "ten"], "positive integer"),
        (["compare", "--batch-size", "1"], "BatchNorm"),
        (["demo", "--seed", "-1"], "non-negative"),
        (["demo", "--steps", "0"], "positive integer"),
    ],
)
def test_bad_arguments_are_rejected_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_batch_size_larger_than_the_training_set_fails_before_training(
    command, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(compare, "execute", lambda *a: pytest.fail("training started"))
    monkeypatch.setattr(demo, "train_from_scratch", lambda *a, **k: pytest.fail("training"))
    assert _main([command, "--out", str(tmp_path / "out"), "--batch-size", "1348"]) == 2
    message = "--batch-size 1348 exceeds the 1347 training samples of 'digits'"
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_unwritable_output_directory_fails_before_training(command, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(compare, "execute", lambda *a: pytest.fail("training started"))
    monkeypatch.setattr(demo, "train_from_scratch", lambda *a, **k: pytest.fail("training"))
    assert _main([command, "--out", str(blocker / "out")]) == 2
    captured = capsys.readouterr()
    assert "not writable" in captured.out + captured.err


# ------------------------------------------------------------------------ data from disk

CIFAR_GRID = [
    "--datasets", "cifar10", "--models", "mlp-bn", "--optimizers", "psi-sgd-momentum", "sgd",
    "--lr-factors", "1", "--init-scales", "1", "--seeds", "1", "--batch-size", "25",
]  # fmt: skip


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, per_file=20)
    return root


def test_compare_on_cifar_files_with_the_recipe_trains_and_resumes(
    cifar_dir, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    recipe = ["--epochs", "2", "--schedule", "cosine", "--warmup-epochs", "0.5"]
    argv = ["compare", *CIFAR_GRID, *recipe, "--data-dir", str(cifar_dir), "--out", str(out)]
    assert _main(argv) == 0
    runs = _runs(out)
    assert [r["optimizer"] for r in runs] == ["psi-sgd-momentum", "sgd"]
    for run in runs:
        assert RUN_FIELDS <= run.keys()
        assert (run["epochs"], run["steps"], run["log_every"]) == (2, 8, 4)
        recipe_fields = (run["schedule"], run["warmup_epochs"], run["augment"])
        assert recipe_fields == ("cosine", 0.5, "crop-flip")
        assert len(run["loss_curve"]) == 2 and run["device"] == "cpu"
    summary = (out / "summary.md").read_text()
    assert "2 epochs of batch 25" in summary and "mean over an epoch" in summary
    assert "Training: learning-rate schedule cosine after 0.5 warm-up epoch(s)" in summary
    assert f"--data-dir {cifar_dir}" in summary and "--epochs 2" in summary
    assert (out / "heatmap-mlp-bn-cifar10.png").stat().st_size > 1000
    monkeypatch.setattr(compare, "execute", lambda *a: pytest.fail("nothing left to run"))
    assert _main([*argv, "--resume"]) == 0
    assert _runs(out) == runs


def _mnist_files_only(root: Path) -> None:
    write_mnist(root)


def _broken_cifar_batch(root: Path) -> None:
    write_cifar(root, per_file=20)
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x02garbage")


@pytest.mark.parametrize(
    "prepare, options, message",
    [
        (None, [], "cifar10 is read from disk: it needs a data directory (--data-dir)"),
        (None, ["--data-dir", "{root}/nowhere"], "the data directory"),
        (_mnist_files_only, ["--data-dir", "{root}"], "cifar10: expected the files data_batch_1"),
        (_broken_cifar_batch, ["--data-dir", "{root}"], "data_batch_2 is not a CIFAR python"),
        (write_cifar, ["--data-dir", "{root}", "--batch-size", "101"], "exceeds the 100 training"),
        (write_cifar, ["--data-dir", "{root}", "--precision", "fp16"], "needs --device cuda"),
        (write_cifar, ["--data-dir", "{root}", "--cifar-stem"], "applies to torchvision:NAME"),
        (None, ["--datasets", "digits", "--augment", "crop-flip"], "applies to image datasets"),
        (None, ["--device", "tpu"], "expected cpu, cuda or cuda:N"),
        (None, ["--warmup-epochs", "1"], "--warmup-epochs 1 leaves nothing of --epochs 1"),
    ],
)
def test_bad_data_and_recipe_fail_before_training(
    prepare, options, message, tmp_path, monkeypatch, capsys
):
    root = tmp_path / "data"
    root.mkdir()
    if prepare is write_cifar:
        write_cifar(root, per_file=20)
    elif prepare is not None:
        prepare(root)
    monkeypatch.setattr(compare, "execute", lambda *a: pytest.fail("training started"))
    options = [option.format(root=root) for option in options]
    argv = ["compare", *CIFAR_GRID, "--epochs", "1", *options, "--out", str(tmp_path / "out")]
    assert _main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "out" / "results.json").exists()


def test_zoo_model_without_its_package_is_a_parser_error(monkeypatch, capsys):
    from psi_geoopt.experiments import models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        _main(["compare", "--models", "torchvision:resnet18"])
    assert exit_info.value.code == 2
    assert "needs the package 'torchvision': pip install torchvision" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision is not installed (optional)",
)
def test_compare_trains_a_torchvision_model_on_an_image_folder(tmp_path):
    write_image_folder(tmp_path / "folder", train=8, test=2)
    argv = [
        "compare", "--datasets", "imagefolder", "--image-size", "8", "--models",
        "torchvision:resnet18", "--cifar-stem", "--optimizers", "psi-sgd-momentum",
        "--lr-factors", "1", "--init-scales", "1", "--seeds", "1", "--epochs", "1",
        "--batch-size", "8", "--data-dir", str(tmp_path / "folder"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert _main(argv) == 0
    (run,) = _runs(tmp_path / "out")
    assert run["model"] == "torchvision:resnet18" and run["cifar_stem"] and run["image_size"] == 8
    assert (run["steps"], len(run["loss_curve"])) == (3, 1)
    assert (tmp_path / "out" / "heatmap-torchvision-resnet18-imagefolder.png").exists()


def test_bench_quick_writes_ratios(tmp_path):
    """One round of ``psi-geoopt bench --quick``: every table has its baseline at ratio 1."""
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--rounds", "1", "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    tables = [results["steps"]["resnet18"], results["adam"]["resnet18"], results["training_step"]]
    for table in tables:
        rows = list(table["results"].values())
        assert rows[0]["ratio"] == 1.0
        assert all(row["median_ms"] > 0 for row in rows)
    assert "PSI fast path eager" in results["steps"]["resnet18"]["results"]
    # the row of the README's headline ratio
    assert "PSI fast path default" in results["steps"]["resnet18"]["results"]
    assert "PSI fast path default" in results["training_step"]["results"]
    assert "PSI RiemannianAdam fast" in results["adam"]["resnet18"]["results"]
    assert "PSI reference loop" not in results["steps"]["resnet18"]["results"]


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_command_without_the_cli_extra_names_it_in_one_line(command, without_cli_extra):
    code = "import sys; from psi_geoopt.cli import main; sys.exit(main(sys.argv[1:]))"
    result = without_cli_extra(code, command, "--steps", "1")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'psi-geoopt[cli]'" in lines[0] and command in lines[0]


# ------------------------------------------------------------------------------- help texts

RST_OR_LATEX = re.compile(r":(math|func|class|mod|meth|attr|obj|data|ref):|``|\\[a-zA-Z]+|\$")


def _help_texts() -> dict[str, str]:
    parser = cli.build_parser()
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts = {"psi-geoopt": parser.format_help()}
    texts.update({name: sub.format_help() for name, sub in subparsers.choices.items()})
    return texts


def test_help_of_every_sub_command_is_plain_text(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    texts = _help_texts()
    assert set(texts) == {"psi-geoopt", *cli.COMMANDS}
    for name, text in texts.items():
        assert not RST_OR_LATEX.findall(text), f"`psi-geoopt {name} --help` shows markup"
        assert "usage: psi-geoopt" in text
    assert "c ~ LogUniform[1, 10]" in texts["demo"]  # a :math: role of the demo's docstring
    assert "(z - μ) / √(σ² + ε)" in texts["demo"]  # ... broken over two lines


def test_help_is_wrapped_to_the_terminal_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    for name, text in _help_texts().items():
        too_long = [line for line in text.splitlines() if len(line) > 60 and " " in line.strip()]
        assert not too_long, f"`psi-geoopt {name} --help` has lines over 60 characters"


@pytest.mark.parametrize(
    ("tex", "text"),
    [
        (r"\frac{\langle u, v \rangle}{r^2}", "⟨u, v⟩/r²"),
        (r"\frac1{2n}\|XW^\top v - y\|^2", "1/(2n)‖XWᵀ v - y‖²"),
        (r"c\, \operatorname{retr}(w, u)", "c  retr(w, u)"),
        (r"\mathbb{R}^d \setminus \{0\}", "ℝᵈ ∖ {0}"),
        (r"\hat w = w / r", "ŵ = w / r"),
        (r"\lambda_{\max} - \lambda_{\min}", "λₘₐₓ - λₘᵢₙ"),
        (r"\sqrt{\hat v_t / (1 - \beta_2^t)} + \epsilon", "√(v̂ₜ / (1 - β₂ᵗ)) + ε"),
        (r"10^{U(-2, 2)}", "10^(U(-2, 2))"),
    ],
)  # fmt: skip
def test_latex_to_text(tex, text):
    assert cli.latex_to_text(tex) == text


def test_rst_to_text_roles_literals_and_math_blocks():
    text = cli.rst_to_text(
        "See :class:`geoopt.Manifold`, :func:`~psi_geoopt.to_psi`, :mod:`the theory "
        "<psi_geoopt.theory>` and ``dim=0``. The metric::\n\n"
        ".. math::\n\n    g_w(u, v) = \\frac{\\langle u, v \\rangle}{r^2}\n\nAfter."
    )
    assert text == (
        "See geoopt.Manifold, to_psi, the theory and dim=0. The metric:\n\n"
        "    g_w(u, v) = ⟨u, v⟩/r²\n\nAfter."
    )
