r"""The verification suite: which problems, which checks, and how long each runs.

Two budgets: ``quick`` (a few problems and short runs, well under a minute on 2 CPU cores) and
``full`` (every problem, longer runs, a few minutes). For the problems whose smoothness
constant is not known in closed form, :func:`build_problem` estimates it in two stages: the
curvature sampled at two random initial points gives a probe step :math:`1/L_0`; PSI GD with
that step for ``probe_steps`` steps from the checks' own initial point gives more points,
sampled in turn; :math:`L` is :data:`~.smoothness.MARGIN` times the largest curvature found.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from . import checks
from .problems import (
    Problem,
    bn_least_squares,
    bn_logistic,
    least_squares_without_bn,
    mlp_digits,
    rayleigh_quotient,
)
from .runs import run
from .smoothness import sampled_curvature, smoothness_from_samples

__all__ = ["BUDGETS", "PROBLEMS", "Budget", "build_problem", "run_suite"]

PROBLEMS: dict[str, Callable[[], Problem]] = {
    "rayleigh-k10": lambda: rayleigh_quotient(10),
    "rayleigh-k100": lambda: rayleigh_quotient(100),
    "rayleigh-k1000": lambda: rayleigh_quotient(1000),
    "bn-least-squares": bn_least_squares,
    "bn-logistic": bn_logistic,
    "bn-logistic-minibatch": lambda: bn_logistic(num_batches=4),
    "mlp-digits": mlp_digits,
    "mlp-digits-minibatch": lambda: mlp_digits(num_batches=8),
}


def _grid(low: int, high: int) -> tuple[float, ...]:
    r"""Step-size factors :math:`2^{k/2}`, :math:`k = ` ``low`` … ``high`` − 1 (times :math:`1/L`):
    ratio :math:`\sqrt 2`, fine enough that the best rate of either method is within a factor
    1.19 of a grid point (a coarser grid favours Euclidean GD, whose growing norms adapt
    its effective step, over PSI GD, whose step must sit just below the stability limit)."""
    return tuple(2.0 ** (k / 2) for k in range(low, high))


@dataclass(frozen=True)
class Budget:
    """Problems and run lengths of one mode of the suite."""

    gd_problems: tuple[str, ...]
    gd_steps: int
    sgd_problems: tuple[str, ...]
    sgd_steps: int
    schedule_problems: tuple[str, ...]
    sgd_seeds: int
    sgd_horizons: tuple[int, ...]
    equivariance_problem: str
    equivariance_stochastic_problem: str
    equivariance_steps: int
    comparisons: tuple[tuple[str, int, float], ...]  # (problem, max steps, relative eps)
    comparison_grid: tuple[float, ...]
    control_problems: tuple[str, ...]
    control_factor: float
    control_steps: int
    probe_steps: int


BUDGETS = {
    "quick": Budget(
        gd_problems=("rayleigh-k10", "rayleigh-k1000", "bn-least-squares", "mlp-digits"),
        gd_steps=200,
        sgd_problems=("bn-logistic-minibatch",),
        sgd_steps=150,
        schedule_problems=("bn-logistic-minibatch",),
        sgd_seeds=3,
        sgd_horizons=(16, 64, 256),
        equivariance_problem="bn-least-squares",
        equivariance_stochastic_problem="bn-logistic-minibatch",
        equivariance_steps=100,
        comparisons=(("bn-least-squares", 150, 1e-2),),
        comparison_grid=_grid(-6, 14),
        control_problems=("rayleigh-k10", "bn-least-squares"),
        control_factor=10.0,
        control_steps=50,
        probe_steps=100,
    ),
    "full": Budget(
        gd_problems=(
            "rayleigh-k10",
            "rayleigh-k100",
            "rayleigh-k1000",
            "bn-least-squares",
            "bn-logistic",
            "mlp-digits",
        ),
        gd_steps=1500,
        sgd_problems=("bn-logistic-minibatch", "mlp-digits-minibatch"),
        sgd_steps=500,
        schedule_problems=("bn-logistic-minibatch", "mlp-digits-minibatch"),
        sgd_seeds=4,
        sgd_horizons=(50, 150, 450, 1350),
        equivariance_problem="mlp-digits",
        equivariance_stochastic_problem="mlp-digits-minibatch",
        equivariance_steps=200,
        comparisons=(
            ("rayleigh-k10", 1000, 1e-3),
            ("bn-least-squares", 1000, 1e-3),
            ("bn-logistic", 3000, 1e-3),
            ("mlp-digits", 500, 1e-2),
        ),
        comparison_grid=_grid(-13, 21),
        control_problems=("rayleigh-k10", "bn-least-squares", "mlp-digits"),
        control_factor=10.0,
        control_steps=50,
        probe_steps=200,
    ),
}


@cache
def build_problem(name: str, probe_steps: int = 100) -> Problem:
    """The problem ``name`` of :data:`PROBLEMS` with its smoothness constant attached
    (estimated as in the module docstring when not known in closed form; cached)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; valid: {', '.join(PROBLEMS)}")
    problem = PROBLEMS[name]()
    if problem.smoothness is not None:
        return problem
    generator = torch.Generator().manual_seed(0)
    starts = [problem.initial_point(seed) for seed in (0, 1)]
    first = max(sampled_curvature(problem, p, generator=generator) for p in starts)
    probe_rate = 1.0 / smoothness_from_samples(first, len(starts)).value
    probe = run(problem, starts[0], "psi-gd", probe_rate, probe_steps, keep_points=True)
    visited = [probe.points[len(probe.points) // 4], probe.points[-1]]
    second = max(sampled_curvature(problem, p, generator=generator) for p in visited)
    problem.smoothness = smoothness_from_samples(max(first, second), len(starts) + len(visited))
    return problem


def run_suite(mode: str, report: Callable[[str], None] = lambda message: None) -> list[dict]:
    """Every check of the ``mode`` budget (``"quick"`` or ``"full"``), as records.

    ``report`` receives a line before each group of checks (progress).
    """
    if mode not in BUDGETS:
        raise ValueError(f"unknown `mode` {mode!r}; valid: {', '.join(BUDGETS)}")
    budget = BUDGETS[mode]

    def problem(name: str) -> Problem:
        return build_problem(name, budget.probe_steps)

    records: list[dict] = []

    def add(check: Callable, *arguments) -> None:
        """Run one check function; its records get the seconds that the call took."""
        start = time.perf_counter()
        result = check(*arguments)
        seconds = round(time.perf_counter() - start, 2)
        for record in result if isinstance(result, tuple) else (result,):
            records.append({**record, "seconds": seconds})

    for name in budget.gd_problems:
        report(f"GD rate on {name}")
        add(checks.gd_rate, problem(name), budget.gd_steps)
    for name in budget.sgd_problems:
        report(f"SGD rate on {name}")
        add(checks.sgd_rate, problem(name), budget.sgd_steps, budget.sgd_seeds)
    for name in budget.schedule_problems:
        report(f"SGD 1/sqrt(T) schedule on {name}")
        add(checks.sgd_schedule, problem(name), budget.sgd_horizons, budget.sgd_seeds)
    report("equivariance")
    deterministic = problem(budget.equivariance_problem)
    for optimizer in ("psi-gd", "psi-momentum", "psi-adam"):
        add(checks.equivariance, deterministic, optimizer, budget.equivariance_steps)
    stochastic = problem(budget.equivariance_stochastic_problem)
    add(checks.equivariance, stochastic, "psi-sgd", budget.equivariance_steps)
    add(checks.euclidean_inequivalence, deterministic, budget.equivariance_steps)
    for name, max_steps, tolerance in budget.comparisons:
        report(f"Euclidean comparison on {name}")
        add(
            checks.euclidean_comparison, problem(name), max_steps, tolerance, budget.comparison_grid
        )
    report("negative controls")
    controls = [problem(name) for name in budget.control_problems]
    add(checks.descent_violation_control, controls, budget.control_factor, budget.control_steps)
    add(
        checks.non_psi_equivariance_control,
        least_squares_without_bn(),
        1.0 / deterministic.L,
        budget.equivariance_steps,
    )
    return records
