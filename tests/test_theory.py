"""Tests of theory/: the test problems, the smoothness constants and ``psi-geoopt verify``."""

from __future__ import annotations

import argparse
import itertools
import json
import math

import psi_geoopt.theory
import pytest
import torch
from matplotlib import mathtext
from psi_geoopt.theory import checks, verify
from psi_geoopt.theory.plots import FIGURES
from psi_geoopt.theory.problems import least_squares_without_bn, rayleigh_quotient
from psi_geoopt.theory.runs import batch_sequence, run
from psi_geoopt.theory.smoothness import curvature_along_curves, sampled_curvature
from psi_geoopt.theory.suite import BUDGETS, PROBLEMS, build_problem

from psi_geoopt import cli

REQUIRED = {
    "name": str,
    "statement": str,
    "hypotheses_hold": bool,
    "relation": str,
    "passed": bool,
}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny float64 problems: one thread is fastest, and fair to a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------- verify --quick


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("verify")
    parser = argparse.ArgumentParser()
    verify.add_arguments(parser)
    args = parser.parse_args(
        ["--quick", "--json", str(directory / "checks.json"), "--plots", str(directory)]
    )
    code = verify.run(args)
    return code, json.loads((directory / "checks.json").read_text()), directory


def test_quick_run_exits_zero_and_writes_plots(quick_run):
    code, _, directory = quick_run
    assert code == 0
    for name in ("gd_rate.png", "sgd_rate.png", "sgd_schedule.png"):
        assert (directory / name).stat().st_size > 0


def test_quick_json_schema(quick_run):
    _, report, _ = quick_run
    assert report["mode"] == "quick"
    for key in ("duration_s", "machine", "started_utc"):
        assert key in report
    for key in ("cpu", "cpu_count", "torch_threads", "torch", "geoopt", "psi-geoopt"):
        assert key in report["machine"]
    checks = report["checks"]
    assert len({c["name"] for c in checks}) == len(checks)
    for check in checks:
        for key, kind in REQUIRED.items():
            assert isinstance(check[key], kind), (check["name"], key)
        assert "observed" in check and "bound" in check
    names = " ".join(c["name"] for c in checks)
    for family in (
        "gd-rate/",
        "gd-descent/",
        "sgd-rate/",
        "sgd-schedule/",
        "sgd-schedule-decrease/",
        "equivariance/",
        "euclidean-inequivalence/",
        "euclidean-comparison/",
        "euclidean-start-dependence/",
        "euclidean-norm-growth/",
        "control/",
    ):
        assert family in names, family
    for optimizer in ("psi-gd", "psi-sgd", "psi-momentum", "psi-adam"):
        assert f"equivariance/{optimizer}/" in names


def test_quick_every_check_passes_and_controls_fire(quick_run):
    _, report, _ = quick_run
    controls = [c for c in report["checks"] if c.get("expect_violation")]
    assert len(controls) == 2
    for control in controls:
        assert control["violated"] is True, control["name"]
    for check in report["checks"]:
        if not check.get("expect_violation"):
            assert check["hypotheses_hold"], check["name"]
            assert check["passed"], check["name"]
            assert "expect_violation" not in check


def test_quick_every_record_reads_one_way(quick_run):
    """``passed`` is exactly ``observed relation bound``; a control's ``violated`` is its
    negation; the printed row shows the same three things."""
    _, report, _ = quick_run
    table = verify.format_checks(report["checks"]).splitlines()
    for check in report["checks"]:
        relation = check["relation"]
        assert relation in checks.RELATIONS, check["name"]
        holds = checks.holds(check["observed"], relation, check["bound"])
        assert check["passed"] == holds, check["name"]
        if check.get("expect_violation"):
            assert check["violated"] == (not holds), check["name"]
        (row,) = [line for line in table if line.split()[0] == check["name"]]
        observed, shown_relation, bound = row.split()[-4:-1]
        assert shown_relation == relation, row
        assert checks.holds(float(observed), relation, float(bound)) == holds, row


def test_quick_bounds_are_the_stated_formulas(quick_run):
    """Both sides of the GD and SGD bounds recomputed from the recorded constants, at the
    reported horizon, which is the tightest one."""
    _, report, _ = quick_run
    for check in report["checks"]:
        if check["name"].startswith(("gd-rate/", "sgd-rate/")):
            horizon = check["reported_T"]
            assert 1 <= horizon <= check["T"]
            expected = 2 * (check["f_w0"] - check["f_star"]) / (check["eta"] * horizon)
            if check["name"].startswith("sgd-rate/"):
                expected += check["L"] * check["eta"] * check["sigma_sq"]
                assert check["bound"] > check["L"] * check["eta"] * check["sigma_sq"] > 0
            assert check["bound"] == pytest.approx(expected, rel=1e-12)
            assert check["observed"] / check["bound"] == pytest.approx(check["worst_ratio"])
        if check["name"].startswith("gd-rate/"):
            assert check["eta"] <= 1 / check["L"] * (1 + 1e-12)
            assert check["max_step_curvature"] <= check["L"]


def test_quick_descent_reports_both_sides_of_the_worst_step(quick_run):
    _, report, _ = quick_run
    for check in report["checks"]:
        if check["name"].startswith("gd-descent/"):
            after, guaranteed = check["worst_step_sides"].values()
            # observed: f(w_{t+1}) - f(w_t); bound: -(eta/2)|grad f(w_t)|_g^2 + allowance
            assert guaranteed - after == pytest.approx(check["worst_slack"], abs=1e-15)
            slack = check["bound"] - check["tolerance"] - check["observed"]
            assert slack == pytest.approx(check["worst_slack"], abs=1e-14)


def test_quick_comparison_records_the_scaling_facts(quick_run):
    _, report, _ = quick_run
    (comparison,) = [c for c in report["checks"] if c["name"].startswith("euclidean-comparison/")]
    (dependence,) = [
        c for c in report["checks"] if c["name"].startswith("euclidean-start-dependence/")
    ]
    equal, tuned = comparison["iterations_equal_eta"], comparison["iterations_tuned_eta"]
    assert len({equal[f"psi-gd@{start}"] for start in ("0.1", "1", "10", "mixed")}) == 1
    assert comparison["observed"] == 0
    assert dependence["observed"] == len(set(dependence["iterations"].values())) >= 2
    assert dependence["iterations"] == {
        start: equal[f"euclidean-gd@{start}"] for start in ("0.1", "1", "10", "mixed")
    }
    assert comparison["euclidean_tuned_scale_free"]
    assert comparison["tuned_iteration_ratio"]["1"] == pytest.approx(
        tuned["euclidean-gd@1"] / tuned["psi-gd"]
    )
    grid = comparison["eta_grid_factors"]
    assert max(b / a for a, b in itertools.pairwise(grid)) <= 2**0.5 * (1 + 1e-12)


def test_quick_bottom_line_uses_the_rows_numbers(quick_run):
    """Every case of the bottom line carries the counts of its per-start row, and the
    verdict names exactly the cases where PSI GD needed fewer iterations."""
    _, report, _ = quick_run
    records = report["checks"]
    (comparison,) = [c for c in records if c["name"].startswith("euclidean-comparison/")]
    tuned = comparison["iterations_tuned_eta"]
    starts = {"starts 0.1/1/10": "1", "start mixed": "mixed"}
    starts.update({f"start {c}": c for c in ("0.1", "1", "10")})
    for case in verify.tuned_cases(records):
        start = starts[case["start"]]
        assert case["psi"] == tuned["psi-gd"]
        assert case["euclidean"] == tuned[f"euclidean-gd@{start}"]
        psi_fewer = case["euclidean"] is None or (
            case["psi"] is not None and case["psi"] < case["euclidean"]
        )
        assert (case["faster"] == "psi") == (psi_fewer and case["psi"] is not None)
    text = "\n".join(verify.bottom_line(records))
    wins = [c for c in verify.tuned_cases(records) if c["faster"] == "psi"]
    for case in verify.tuned_cases(records):
        described = f"{case['problem']}, {case['start']}: PSI {case['psi']}, Euclidean "
        assert described + str(case["euclidean"]) in text
    if wins and len(wins) < len(verify.tuned_cases(records)):
        assert f"reproduces in {len(wins)} of" in text


def _comparison(problem: str, psi: int, euclidean: dict[str, int | None]) -> dict:
    """A comparison record with the tuned counts ``psi`` and ``euclidean`` (per start)."""

    def faster(euclidean_count):
        if euclidean_count is None or psi < euclidean_count:
            return "psi"
        return "euclidean" if euclidean_count < psi else "tie"

    return {
        "name": f"euclidean-comparison/{problem}",
        "problem": problem,
        "faster": {
            "equal_eta": {start: "psi" for start in euclidean},
            "tuned_eta": {start: faster(count) for start, count in euclidean.items()},
        },
        "iterations_tuned_eta": {
            "psi-gd": psi,
            **{f"euclidean-gd@{start}": count for start, count in euclidean.items()},
        },
    }


def _starts(scaled: int | None, mixed: int | None) -> dict[str, int | None]:
    return {"0.1": scaled, "1": scaled, "10": scaled, "mixed": mixed}


def test_bottom_line_says_who_is_faster():
    assert verify.bottom_line([{"name": "gd-rate/x"}]) == []
    # the quick run's numbers: tuned Euclidean GD faster from c W_0, PSI GD from S W_0
    split = "\n".join(verify.bottom_line([_comparison("bn", 16, _starts(11, 17))]))
    assert "PSI GD faster in 4, Euclidean GD in 0" in split
    assert "mixed: PSI GD faster in 1, Euclidean GD in 1, tie in 0." in split
    assert (
        "reproduces in 1 of 2 cases only (bn, start mixed: PSI 16, Euclidean 17), not in the "
        "other 1 (bn, starts 0.1/1/10: PSI 16, Euclidean 11)" in split
    )
    lost = "\n".join(verify.bottom_line([_comparison("b", 20, _starts(10, 20))]))
    assert "does not reproduce against tuned Euclidean GD" in lost
    assert "tie in 1" in lost
    won = "\n".join(
        verify.bottom_line(
            [_comparison("a", 10, _starts(20, None)), _comparison("c", 5, _starts(6, 7))]
        )
    )
    assert "reproduces: PSI GD needed fewer iterations than tuned Euclidean GD in every case" in won
    assert "Bottom line (2 problems" in won
    # counts that differ between the starts c W_0 are listed one by one
    apart = verify.tuned_cases([_comparison("d", 10, {"0.1": 9, "1": 11, "10": 12, "mixed": 8})])
    assert [(c["start"], c["euclidean"], c["faster"]) for c in apart] == [
        ("start 0.1", 9, "euclidean"),
        ("start 1", 11, "psi"),
        ("start 10", 12, "psi"),
        ("start mixed", 8, "euclidean"),
    ]


def test_holds_is_the_stated_relation():
    assert checks.holds(1.0, "<=", 1.0) and checks.holds(1.0, ">=", 1.0)
    assert checks.holds(0.5, "<=", 1.0) and not checks.holds(0.5, ">=", 1.0)
    assert checks.holds(-2, ">=", -3) and not checks.holds(-2, "<=", -3)
    for missing in (None, math.nan):
        assert not checks.holds(missing, "<=", 1.0) and not checks.holds(missing, ">=", 1.0)
        assert not checks.holds(1.0, "<=", missing)
    with pytest.raises(ValueError, match="relation"):
        checks.holds(1.0, "<", 2.0)


def test_table_reads_old_records_without_relation_as_at_most():
    record = {"name": "old/x", "hypotheses_hold": True, "observed": 0.5, "bound": 1.0}
    (row,) = verify.format_checks([{**record, "passed": True}]).splitlines()[2:]
    assert row.split()[-4:] == ["0.5", "<=", "1", "pass"]


def test_table_shows_enough_digits_to_tell_the_sides_apart():
    record = {
        "name": "x",
        "hypotheses_hold": True,
        "observed": 0.50001,
        "relation": "<=",
        "bound": 0.5,
        "passed": False,
    }
    (row,) = verify.format_checks([record]).splitlines()[2:]
    assert row.split()[-4:] == ["0.50001", "<=", "0.5", "FAIL"]


def test_plot_labels_are_mathtext():
    parser = mathtext.MathTextParser("path")
    for _, title, ylabel, bound_label in FIGURES.values():
        for label in (title, ylabel, bound_label):
            assert label.count("$") == 2, label
            parser.parse(label[label.index("$") : label.rindex("$") + 1])


def test_package_docstring_explains_the_records():
    doc = psi_geoopt.theory.__doc__
    assert doc is not None and "psi-geoopt verify" in doc.splitlines()[0]
    assert "relation" in doc and "passed" in doc


def test_failures_flags_failed_checks_and_silent_controls():
    records = [
        {"name": "ok", "hypotheses_hold": True, "passed": True},
        {"name": "bad", "hypotheses_hold": True, "passed": False},
        {"name": "not-required", "hypotheses_hold": False, "passed": False},
        {
            "name": "fired",
            "hypotheses_hold": False,
            "passed": False,
            "expect_violation": True,
            "violated": True,
        },
        {
            "name": "silent",
            "hypotheses_hold": False,
            "passed": True,
            "expect_violation": True,
            "violated": False,
        },
    ]
    assert verify.failures(records) == ["bad", "silent"]


def test_json_path_that_is_a_directory_is_rejected(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    verify.add_arguments(parser)
    assert verify.run(parser.parse_args(["--quick", "--json", str(tmp_path)])) == 2
    assert "--json" in capsys.readouterr().err


def test_help_line_is_the_docstring_summary():
    summary = verify.__doc__.strip().splitlines()[0]
    assert "convergence" in summary


def test_entry_point_dispatches_to_verify():
    args = cli.build_parser().parse_args(["verify", "--quick", "--json", "out.json"])
    assert args.run is verify.run and args.quick and str(args.json) == "out.json"


# ---------------------------------------------------------------------- problems


@pytest.fixture(scope="module", params=list(PROBLEMS))
def problem(request):
    return PROBLEMS[request.param]()


def test_gradient_matches_finite_differences(problem):
    point = problem.initial_point(3)
    generator = torch.Generator().manual_seed(4)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in point]
    _, grads = problem.euclidean_gradient(point)
    exact = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
    h = 1e-6
    with torch.no_grad():
        plus = float(problem.loss([p + h * d for p, d in zip(point, direction, strict=True)]))
        minus = float(problem.loss([p - h * d for p, d in zip(point, direction, strict=True)]))
    assert (plus - minus) / (2 * h) == pytest.approx(exact, rel=1e-6, abs=1e-9)


def test_loss_is_positively_scale_invariant_per_group(problem):
    point = problem.initial_point(2)
    scaled = [p * s for p, s in zip(point, problem.group_scales(7, decades=2.0), strict=True)]
    with torch.no_grad():
        assert float(problem.loss(scaled)) == pytest.approx(float(problem.loss(point)), rel=1e-12)
    _, grad = problem.riemannian_gradient(point)
    _, grad_scaled = problem.riemannian_gradient(scaled)
    assert problem.inner(scaled, grad_scaled) == pytest.approx(
        problem.inner(point, grad), rel=1e-10
    )


def test_f_star_is_below_the_loss(problem):
    for seed in range(3):
        with torch.no_grad():
            assert problem.f_star <= float(problem.loss(problem.initial_point(seed)))


def test_batch_gradients_average_to_the_full_gradient(problem):
    point = problem.initial_point(1)
    losses, stacked = problem.batch_gradients(point)
    value, grads = problem.euclidean_gradient(point)
    assert float(losses.mean()) == pytest.approx(value, rel=1e-12)
    for g, s in zip(grads, stacked, strict=True):
        torch.testing.assert_close(s.mean(dim=0), g, rtol=1e-10, atol=1e-13)
    last = problem.num_batches - 1
    _, batch_grads = problem.euclidean_gradient(point, last)
    for g, s in zip(batch_grads, stacked, strict=True):
        torch.testing.assert_close(s[last], g, rtol=1e-10, atol=1e-13)


def test_control_problem_is_not_scale_invariant():
    problem = least_squares_without_bn()
    point = problem.initial_point(0)
    with torch.no_grad():
        assert float(problem.loss([2 * p for p in point])) != pytest.approx(
            float(problem.loss(point)), rel=1e-3
        )


# ---------------------------------------------------------------------- smoothness


def _rayleigh_matrix(problem, dimension: int) -> torch.Tensor:
    """The matrix :math:`A` of a Rayleigh-quotient problem: the Hessian of
    :math:`f(w)\\,\\|w\\|^2 / 2 = w^\\top A w / 2`."""

    def quadratic(w):
        return problem.loss([w]) * w.square().sum() / 2

    return torch.autograd.functional.hessian(quadratic, torch.ones(dimension, dtype=torch.float64))


@pytest.mark.parametrize("condition", [10.0, 1000.0])
def test_rayleigh_constant_bounds_sampled_curvature_and_is_attained(condition):
    problem = rayleigh_quotient(condition, dimension=8, seed=3)
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        curvature = sampled_curvature(problem, problem.initial_point(seed), generator=generator)
        assert curvature <= problem.L * (1 + 1e-6)
    eigenvalues, eigenvectors = torch.linalg.eigh(_rayleigh_matrix(problem, 8))
    assert problem.L == pytest.approx(2 * float(eigenvalues[-1] - eigenvalues[0]), rel=1e-8)
    assert problem.f_star == pytest.approx(float(eigenvalues[0]), rel=1e-8)
    bottom, top = eigenvectors[:, 0], eigenvectors[:, -1]
    assert curvature_along_curves(problem, [bottom], [[top]]) == pytest.approx(problem.L, rel=1e-4)


@pytest.mark.parametrize("name", ["bn-least-squares", "bn-logistic-minibatch"])
def test_estimated_constant_bounds_the_curvature_met(name):
    problem = build_problem(name, BUDGETS["quick"].probe_steps)
    assert not problem.smoothness.certified and problem.smoothness.margin >= 1.5
    assert problem.L == pytest.approx(problem.smoothness.margin * problem.smoothness.sampled_max)
    generator = torch.Generator().manual_seed(11)
    assert sampled_curvature(problem, problem.initial_point(9), generator=generator) <= problem.L
    trajectory = run(
        problem,
        problem.initial_point(0),
        "psi-gd",
        1 / problem.L,
        60,
        batch_sequence(problem, 60, 5),
    )
    change = trajectory.values[1:] - trajectory.values[:-1] - trajectory.step_inner
    curvature = 2 * change / trajectory.step_sq
    assert curvature.max() <= problem.L
