r"""Sampled smoothness constants of the pullback :math:`f \circ \operatorname{retr}` in the
metric :math:`g`, for the problems whose constant is not known in closed form.

The descent inequality needs :math:`\varphi(t) \le \varphi(0) + t\varphi'(0) + \frac L2 t^2` for
:math:`\varphi(t) = f(\operatorname{retr}_w(t u))`, :math:`\|u\|_g = 1`; by Taylor's theorem
:math:`L = \sup \varphi''` over points and unit directions suffices. It is estimated at sampled
points :math:`w` (with unit-norm groups, where :math:`g` is the Euclidean metric on the
horizontal space) in two ways, and the larger value is kept:

1. the largest eigenvalue of the pullback Hessian :math:`\nabla^2_u f(\operatorname{retr}_w(
   \operatorname{proj}_w u))|_{u=0}` on the horizontal space (Lanczos, scipy's ``eigsh`` on
   Hessian-vector products by double back-propagation);
2. central second differences of :math:`\varphi` at several :math:`t` along the retraction
   curves in the top eigenvector's direction, the gradient's and random directions.

The reported constant is ``margin`` times the largest sampled curvature. It is an estimate
over the sampled region, not a proof; the checks also measure the curvature of every step
they take and compare it with the constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from .problems import Params, Problem, Smoothness

__all__ = [
    "MARGIN",
    "curvature_along_curves",
    "estimate_smoothness",
    "sampled_curvature",
    "smoothness_from_samples",
    "top_hessian_eigenvalue",
]

MARGIN = 2.0
_CURVE_TIMES = (-0.5, -0.2, -0.05, 0.0, 0.05, 0.2, 0.5)
_DIFFERENCE_STEP = 1e-3


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> Params:
    pieces, start = [], 0
    for t in like:
        pieces.append(vector[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return pieces


def _unit(problem: Problem, point: Sequence[torch.Tensor]) -> Params:
    return [p / n for p, n in zip(point, problem.group_norms(point), strict=True)]


def _normalized(problem: Problem, point: Params, direction: Params) -> Params:
    norm = problem.inner(point, direction) ** 0.5
    return [d / norm for d in direction]


def top_hessian_eigenvalue(problem: Problem, point: Sequence[torch.Tensor]) -> tuple[float, Params]:
    r"""Largest eigenvalue of the pullback Hessian at ``point`` on the horizontal space, in the
    metric :math:`g`, and its eigenvector."""
    point = _unit(problem, point)

    def pullback(*u):
        return problem.loss(problem.retract(point, problem.project(point, u)))

    zeros = tuple(torch.zeros_like(p) for p in point)

    def matvec(vector: np.ndarray) -> np.ndarray:
        v = problem.project(point, _unflatten(torch.as_tensor(vector.ravel()), point))
        _, product = torch.autograd.functional.hvp(pullback, zeros, tuple(v))
        return _flatten(problem.project(point, product)).numpy()

    size = sum(p.numel() for p in point)
    operator = LinearOperator((size, size), matvec=matvec, dtype=np.float64)
    start = np.random.default_rng(0).standard_normal(size)
    values, vectors = eigsh(operator, k=1, which="LA", tol=1e-4, v0=start, maxiter=2000)
    direction = _unflatten(torch.as_tensor(vectors[:, 0]), point)
    return float(values[0]), direction


def curvature_along_curves(
    problem: Problem, point: Sequence[torch.Tensor], directions: Sequence[Params]
) -> float:
    r"""Largest central second difference of :math:`t \mapsto f(\operatorname{retr}_w(t u))`
    over the unit directions ``directions`` (made horizontal) and sample times."""
    point = _unit(problem, point)
    largest = -np.inf
    h = _DIFFERENCE_STEP
    with torch.no_grad():
        for direction in directions:
            u = _normalized(problem, point, problem.project(point, direction))

            def phi(t: float, u: Params = u) -> float:
                return float(problem.loss(problem.retract(point, [t * d for d in u])))

            for t in _CURVE_TIMES:
                largest = max(largest, (phi(t + h) - 2 * phi(t) + phi(t - h)) / h**2)
    return largest


def sampled_curvature(
    problem: Problem,
    point: Sequence[torch.Tensor],
    random_directions: int = 2,
    generator: torch.Generator | None = None,
) -> float:
    """The largest curvature found at ``point``: the top pullback-Hessian eigenvalue and the
    second differences along the curves of its eigenvector, the gradient and random
    directions."""
    top_value, top_direction = top_hessian_eigenvalue(problem, point)
    _, gradient = problem.riemannian_gradient(_unit(problem, point))
    directions = [top_direction, gradient] + [
        [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in point]
        for _ in range(random_directions)
    ]
    return max(top_value, curvature_along_curves(problem, point, directions))


def smoothness_from_samples(largest: float, points: int, margin: float = MARGIN) -> Smoothness:
    """:class:`Smoothness` of ``margin`` times the ``largest`` curvature sampled at ``points``."""
    if margin < 1.5:
        raise ValueError(f"`margin` must be at least 1.5, got {margin}")
    return Smoothness(
        value=margin * max(largest, 0.0),
        method=f"estimated: {margin:g} x max sampled curvature of t -> f(retr(w, t u)) "
        f"(top pullback-Hessian eigenvalue and second differences) at {points} points",
        certified=False,
        sampled_max=largest,
        margin=margin,
    )


def estimate_smoothness(
    problem: Problem,
    points: Sequence[Sequence[torch.Tensor]],
    margin: float = MARGIN,
    seed: int = 0,
) -> Smoothness:
    """``margin`` × the largest curvature sampled at ``points`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    largest = max(sampled_curvature(problem, p, generator=generator) for p in points)
    return smoothness_from_samples(largest, len(points), margin)
