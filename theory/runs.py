r"""Runs of PSI and Euclidean optimizers on a :class:`~.problems.Problem`, recorded step by step.

The PSI algorithms are the package's own: :class:`psi_geoopt.optim.RiemannianSGD` (GD, SGD,
momentum) and :class:`psi_geoopt.optim.RiemannianAdam` on :class:`geoopt.ManifoldParameter` s with
the problem's :class:`~psi_geoopt.PSIManifold` s. Euclidean GD is :class:`torch.optim.SGD` on
the same tensors as plain parameters. At every iterate :math:`w_t` a run records the full loss
:math:`f(w_t)` and :math:`\|\operatorname{grad} f(w_t)\|_g^2` (the full gradient, also for
stochastic runs), then steps with the full gradient or the gradient of one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import geoopt
import numpy as np
import torch

from psi_geoopt.optim import RiemannianAdam, RiemannianSGD

from .problems import Params, Problem

__all__ = ["OPTIMIZERS", "Trajectory", "batch_sequence", "run"]

OptimizerFactory = Callable[[list[torch.nn.Parameter], float], torch.optim.Optimizer]

OPTIMIZERS: dict[str, tuple[bool, OptimizerFactory]] = {
    # name: (on the PSI manifold, factory(params, lr))
    "psi-gd": (True, lambda params, lr: RiemannianSGD(params, lr=lr)),
    "psi-momentum": (True, lambda params, lr: RiemannianSGD(params, lr=lr, momentum=0.9)),
    "psi-adam": (True, lambda params, lr: RiemannianAdam(params, lr=lr)),
    "euclidean-gd": (False, lambda params, lr: torch.optim.SGD(params, lr=lr)),
}


@dataclass
class Trajectory:
    r"""``values[t]`` = :math:`f(w_t)` and ``grad_sq[t]`` = :math:`\|\operatorname{grad}
    f(w_t)\|_g^2` for :math:`t = 0, \dots, T` (shorter if stopped early); optional extras.

    For ``psi-gd`` (plain Riemannian steps :math:`w_{t+1} = \operatorname{retr}_{w_t}(u_t)`,
    :math:`u_t = -\eta \operatorname{grad} f_{(k)}(w_t)`), ``step_inner[t]`` =
    :math:`g(\operatorname{grad} f(w_t), u_t)` and ``step_sq[t]`` = :math:`\|u_t\|_g^2`.
    """

    values: np.ndarray
    grad_sq: np.ndarray
    final: Params
    diverged: bool = False
    points: list[Params] = field(default_factory=list)
    euclidean_grads: list[Params] = field(default_factory=list)
    variances: np.ndarray | None = None
    step_inner: np.ndarray | None = None
    step_sq: np.ndarray | None = None

    @property
    def steps(self) -> int:
        return len(self.values) - 1


def batch_sequence(problem: Problem, steps: int, seed: int) -> list[int | None]:
    """Uniform i.i.d. batch indices (``None`` everywhere for a full-batch problem)."""
    if not problem.stochastic:
        return [None] * steps
    generator = torch.Generator().manual_seed(3000 + seed)
    return torch.randint(problem.num_batches, (steps,), generator=generator).tolist()


def _gradients(problem: Problem, point: Params) -> tuple[float, Params, list[Params]]:
    """:math:`f(w)`, :math:`\\nabla f(w)` and, for a stochastic problem, every
    :math:`\\nabla f_k(w)` (an empty list otherwise)."""
    if not problem.stochastic:
        value, egrad = problem.euclidean_gradient(point)
        return value, egrad, []
    losses, stacked = problem.batch_gradients(point)
    per_batch = [[g[k] for g in stacked] for k in range(problem.num_batches)]
    return float(losses.mean()), [g.mean(dim=0) for g in stacked], per_batch


def minibatch_variance(problem: Problem, point: Params, egrad: Params, per_batch: list[Params]):
    r""":math:`\frac1K\sum_k \|\operatorname{grad} f_k(w) - \operatorname{grad} f(w)\|_g^2`,
    the exact variance of the uniformly sampled batch gradient at :math:`w` (``egrad`` and
    ``per_batch`` are the Euclidean gradients of :math:`f` and of the :math:`f_k`)."""
    total = 0.0
    for batch_grad in per_batch:
        difference = [a - b for a, b in zip(batch_grad, egrad, strict=True)]
        rdifference = [
            m.egrad2rgrad(p, d)
            for m, p, d in zip(problem.manifolds, point, difference, strict=True)
        ]
        total += problem.inner(point, rdifference)
    return total / len(per_batch)


def run(
    problem: Problem,
    initial: Sequence[torch.Tensor],
    optimizer: str,
    lr: float,
    steps: int,
    batches: Sequence[int | None] | None = None,
    stop_grad_norm: float | None = None,
    keep_points: bool = False,
    keep_euclidean_grads: bool = False,
    track_variance: bool = False,
) -> Trajectory:
    r"""``steps`` iterations of ``optimizer`` (a key of :data:`OPTIMIZERS`) with learning
    rate ``lr`` from ``initial``; ``batches[t]`` is the batch of step ``t`` (``None``: full).

    With ``track_variance``, the exact minibatch variance is computed at every iterate.
    Stops early once :math:`\|\operatorname{grad} f(w_t)\|_g \le` ``stop_grad_norm`` or
    when the loss stops being finite (``diverged``).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown `optimizer` {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    on_manifold, factory = OPTIMIZERS[optimizer]
    batches = [None] * steps if batches is None else list(batches)
    if len(batches) < steps:
        raise ValueError(f"`batches` has {len(batches)} entries, fewer than `steps`={steps}")
    if not problem.stochastic and any(b is not None for b in batches):
        raise ValueError(f"`batches`: problem {problem.name!r} has a single batch")
    params = [
        geoopt.ManifoldParameter(p.detach().clone(), manifold=m)
        if on_manifold
        else torch.nn.Parameter(p.detach().clone())
        for p, m in zip(initial, problem.manifolds, strict=True)
    ]
    opt = factory(params, lr)
    values, grad_sq, variances, step_inner, step_sq = [], [], [], [], []
    trajectory = Trajectory(values=np.empty(0), grad_sq=np.empty(0), final=[])
    for t in range(steps + 1):
        point = [p.detach() for p in params]
        value, egrad, per_batch = _gradients(problem, point)
        rgrad = [
            m.egrad2rgrad(p, g) for m, p, g in zip(problem.manifolds, point, egrad, strict=True)
        ]
        values.append(value)
        grad_sq.append(problem.inner(point, rgrad))
        if keep_points:
            trajectory.points.append([p.clone() for p in point])
        if keep_euclidean_grads:
            trajectory.euclidean_grads.append([g.clone() for g in egrad])
        if track_variance:
            variances.append(minibatch_variance(problem, point, egrad, per_batch))
        if not np.isfinite(value) or not np.isfinite(grad_sq[-1]):
            trajectory.diverged = True
            break
        if t == steps or (stop_grad_norm is not None and grad_sq[-1] <= stop_grad_norm**2):
            break
        step_grad = egrad if batches[t] is None else per_batch[batches[t]]
        if optimizer == "psi-gd":
            step = [
                -lr * m.egrad2rgrad(p, g)
                for m, p, g in zip(problem.manifolds, point, step_grad, strict=True)
            ]
            step_inner.append(problem.inner(point, rgrad, step))
            step_sq.append(problem.inner(point, step))
        for p, g in zip(params, step_grad, strict=True):
            p.grad = g
        opt.step()
    trajectory.values = np.asarray(values)
    trajectory.grad_sq = np.asarray(grad_sq)
    trajectory.variances = np.asarray(variances) if track_variance else None
    if optimizer == "psi-gd":
        trajectory.step_inner = np.asarray(step_inner)
        trajectory.step_sq = np.asarray(step_sq)
    trajectory.final = [p.detach().clone() for p in params]
    return trajectory
