r"""Positively scale-invariant test problems for the convergence checks, in float64.

Every problem is a loss :math:`f(W_1, \dots, W_m)` whose parameters all live on PSI factors
(one :class:`~psi_geoopt.PSIManifold` per tensor), so that :math:`f(S \cdot W) = f(W)` for any
positive per-group scaling :math:`S`. Each exposes the loss (full or one minibatch), a seeded
initial point with unit-norm groups, a certified lower bound ``f_star`` of :math:`\inf f` with
the reason it is one, and, once :func:`build_problem` has attached it, the smoothness constant
:math:`L` of the pullback :math:`f \circ \operatorname{retr}` in the metric :math:`g`.

- ``rayleigh-kK``: :math:`f(w) = \hat w^\top A \hat w` with :math:`A = Q \operatorname{diag}(
  \lambda) Q^\top`, eigenvalues log-spaced in :math:`[1, K]`; :math:`f^* = \lambda_{\min}` and
  :math:`L = 2(\lambda_{\max} - \lambda_{\min})` exactly (theory/README.md).
- ``bn-least-squares``: :math:`f(W) = \frac{1}{2n}\|\operatorname{BN}(X W^\top) v - y\|^2`
  with four groups (rows of :math:`W`) and a fixed read-out :math:`v`.
- ``bn-logistic``: :math:`f(W) = \frac1n \sum_i \log(1 + e^{-y_i \operatorname{BN}(X W^\top)_i
  v})` with three groups, labels :math:`y_i = \pm 1`.
- ``mlp-digits`` / ``mlp-digits-minibatch``: the first ``samples`` of scikit-learn's bundled
  8x8 digits, each pixel standardized over them, → Linear :math:`W_1` → BN → tanh → Linear
  :math:`W_2` → BN → :math:`\gamma\,\cdot` → cross-entropy; every row of both weights is a PSI
  group. The minibatch version splits the data into a fixed partition of ``num_batches``
  batches, each normalized with its own statistics ("ghost batches"), and
  :math:`f = \frac1K \sum_k f_k`, so a uniformly drawn batch gives an unbiased gradient.

BatchNorm is written without the :math:`\epsilon` of :class:`torch.nn.BatchNorm1d`
(:math:`\operatorname{BN}(z) = (z - \bar z) / \operatorname{std}(z)`) so that the losses are
exactly scale invariant, and tanh (smooth) follows the first BN so that :math:`f` is smooth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from psi_geoopt import PSIManifold

__all__ = [
    "Problem",
    "Smoothness",
    "batch_norm",
    "bn_least_squares",
    "bn_logistic",
    "least_squares_without_bn",
    "mlp_digits",
    "rayleigh_quotient",
]

DTYPE = torch.float64
Params = list[torch.Tensor]


def batch_norm(z: torch.Tensor) -> torch.Tensor:
    r"""Training-mode batch normalization over axis ``-2`` without :math:`\epsilon` and affine
    map: :math:`(z - \bar z)/\sigma(z)`; exactly invariant under positive rescaling of ``z``."""
    centred = z - z.mean(dim=-2, keepdim=True)
    return centred / centred.square().mean(dim=-2, keepdim=True).sqrt()


@dataclass(frozen=True)
class Smoothness:
    r"""The constant :math:`L` with :math:`f(\operatorname{retr}_w u) \le f(w) + g(\operatorname{
    grad} f, u) + \frac L2 \|u\|_g^2`, how it was obtained, and whether it is a proven bound."""

    value: float
    method: str
    certified: bool
    sampled_max: float | None = None
    margin: float | None = None


@dataclass
class Problem:
    r"""A PSI loss :math:`f = \frac1K \sum_{k<K} f_k` over tensors on PSI factors.

    ``batch_loss(params, batches)`` returns the losses :math:`f_k` of the batches selected by
    ``batches`` (an index or a slice over the ``num_batches`` axis). Called with ``slice(None)``
    and parameters that carry a leading axis of size ``num_batches``, it evaluates batch
    :math:`k` at the parameters :math:`W[k]`: that is how :meth:`batch_gradients` gets every
    batch gradient from one backward pass.
    """

    name: str
    description: str
    manifolds: tuple[PSIManifold, ...]
    shapes: tuple[tuple[int, ...], ...]
    batch_loss: Callable[[Sequence[torch.Tensor], slice | int], torch.Tensor]
    f_star: float
    f_star_method: str
    num_batches: int = 1
    smoothness: Smoothness | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ the loss

    @property
    def L(self) -> float:
        if self.smoothness is None:
            raise RuntimeError(f"problem {self.name!r}: the smoothness constant is not set yet")
        return self.smoothness.value

    @property
    def stochastic(self) -> bool:
        return self.num_batches > 1

    def loss(self, params: Sequence[torch.Tensor], batch: int | None = None) -> torch.Tensor:
        """:math:`f` (``batch=None``) or the loss :math:`f_k` of batch ``k``."""
        if batch is None:
            return self.batch_loss(params, slice(None)).mean()
        if not 0 <= batch < self.num_batches:
            raise ValueError(f"`batch` must be in [0, {self.num_batches}), got {batch}")
        return self.batch_loss(params, batch)

    def euclidean_gradient(
        self, params: Sequence[torch.Tensor], batch: int | None = None
    ) -> tuple[float, Params]:
        """The loss and its Euclidean gradient :math:`\\nabla f` (or :math:`\\nabla f_k`)."""
        leaves = [p.detach().requires_grad_(True) for p in params]
        value = self.loss(leaves, batch)
        grads = torch.autograd.grad(value, leaves)
        return float(value.detach()), list(grads)

    def batch_gradients(self, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Params]:
        r"""The losses :math:`f_k(w)` and Euclidean gradients :math:`\nabla f_k(w)` of all
        batches, stacked along a new leading axis, from a single backward pass."""
        leaves = [
            p.detach().expand(self.num_batches, *p.shape).clone().requires_grad_(True)
            for p in params
        ]
        losses = self.batch_loss(leaves, slice(None))
        grads = torch.autograd.grad(losses.sum(), leaves)
        return losses.detach(), list(grads)

    def riemannian_gradient(
        self, params: Sequence[torch.Tensor], batch: int | None = None
    ) -> tuple[float, Params]:
        """The loss and :math:`\\operatorname{grad} f` = ``egrad2rgrad`` of every tensor."""
        value, grads = self.euclidean_gradient(params, batch)
        return value, [
            m.egrad2rgrad(p, g) for m, p, g in zip(self.manifolds, params, grads, strict=True)
        ]

    # ------------------------------------------------------------------ product geometry

    def inner(self, params: Sequence[torch.Tensor], u: Sequence[torch.Tensor], v=None) -> float:
        r"""Product metric :math:`\sum_{\text{tensors, groups}} g_w(u, v)`."""
        v = u if v is None else v
        return float(
            sum(
                m.inner(p, a, b).sum()
                for m, p, a, b in zip(self.manifolds, params, u, v, strict=True)
            )
        )

    def retract(self, params: Sequence[torch.Tensor], u: Sequence[torch.Tensor]) -> Params:
        return [m.retr(p, d) for m, p, d in zip(self.manifolds, params, u, strict=True)]

    def project(self, params: Sequence[torch.Tensor], u: Sequence[torch.Tensor]) -> Params:
        return [m.proju(p, d) for m, p, d in zip(self.manifolds, params, u, strict=True)]

    def distance(self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
        """Largest quotient distance (angle between rays) over all groups of all tensors."""
        return max(float(m.dist(x, y).max()) for m, x, y in zip(self.manifolds, a, b, strict=True))

    def group_norms(self, params: Sequence[torch.Tensor]) -> Params:
        """Per-group Euclidean norms, broadcastable against each tensor."""
        return [_group_norm(m, p) for m, p in zip(self.manifolds, params, strict=True)]

    # ------------------------------------------------------------------ points

    def initial_point(self, seed: int = 0) -> Params:
        """A Gaussian point with every group rescaled to unit norm."""
        generator = torch.Generator().manual_seed(1000 + seed)
        points = [torch.randn(shape, generator=generator, dtype=DTYPE) for shape in self.shapes]
        return [p / n for p, n in zip(points, self.group_norms(points), strict=True)]

    def group_scales(self, seed: int, decades: float = 1.0) -> Params:
        """Positive per-group factors :math:`10^{U(-d, d)}`, broadcastable to each tensor."""
        generator = torch.Generator().manual_seed(2000 + seed)
        unit = self.initial_point(seed)
        return [
            10.0 ** (decades * (2 * torch.rand(n.shape, generator=generator, dtype=DTYPE) - 1))
            for n in self.group_norms(unit)
        ]


def _group_norm(manifold: PSIManifold, x: torch.Tensor) -> torch.Tensor:
    if manifold.dim is None:
        return torch.linalg.vector_norm(x).reshape((1,) * x.dim())
    axis = manifold.dim % x.dim()
    axes = tuple(a for a in range(x.dim()) if a != axis)
    return torch.linalg.vector_norm(x, dim=axes, keepdim=True)


# ---------------------------------------------------------------------- Rayleigh quotients


def rayleigh_quotient(condition: float, dimension: int = 20, seed: int = 0) -> Problem:
    r""":math:`f(w) = w^\top A w / w^\top w`, one group, spectrum log-spaced in :math:`[1,
    \kappa]`; :math:`L = 2(\lambda_{\max} - \lambda_{\min})` is exact for the projective
    retraction (see theory/README.md)."""
    if condition <= 1:
        raise ValueError(f"`condition` must be > 1, got {condition}")
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dimension, dimension, generator=generator, dtype=DTYPE))
    eigenvalues = torch.logspace(0, math.log10(condition), dimension, dtype=DTYPE)
    matrix = (basis * eigenvalues) @ basis.T
    matrix = (matrix + matrix.T) / 2

    def batch_loss(params, batches):
        (w,) = params
        return (((w @ matrix) * w).sum(dim=-1) / w.square().sum(dim=-1)).reshape(-1)[batches]

    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    problem = Problem(
        name=f"rayleigh-k{condition:g}",
        description=f"Rayleigh quotient, d={dimension}, spectrum log-spaced in [1, {condition:g}]",
        manifolds=(PSIManifold(dim=None),),
        shapes=((dimension,),),
        batch_loss=batch_loss,
        f_star=low,
        f_star_method="exact: the smallest eigenvalue of A",
    )
    problem.smoothness = Smoothness(
        value=2 * (high - low),
        method="analytic: 2 (lambda_max - lambda_min), sharp for the projective retraction",
        certified=True,
    )
    return problem


# ---------------------------------------------------------------------- BN regression models


def _partition(inputs: np.ndarray, targets: np.ndarray, num_batches: int):
    """Inputs and targets as tensors of shape ``(num_batches, n / num_batches, ...)``."""
    size = len(inputs) // num_batches
    used = size * num_batches
    x = torch.as_tensor(inputs[:used], dtype=DTYPE).reshape(num_batches, size, -1)
    y = torch.as_tensor(targets[:used]).reshape(num_batches, size)
    return x, y


def _synthetic_regression(samples: int, features: int, seed: int):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((features, features)) / math.sqrt(features)
    inputs = rng.standard_normal((samples, features)) @ (np.eye(features) + mixing)
    teacher = rng.standard_normal(features)
    return inputs, inputs @ teacher, rng


def bn_least_squares(
    samples: int = 256, features: int = 10, groups: int = 4, seed: int = 0
) -> Problem:
    r""":math:`\frac1{2n}\|\operatorname{BN}(XW^\top)v - y_c\|^2` with :math:`y_c` centred.

    Every column of :math:`\operatorname{BN}(XW^\top)` lies in the column space of the
    centred inputs :math:`X_c`, so :math:`f \ge \frac1{2n}\min_b \|X_c b - y_c\|^2`: that
    least-squares residual is the certified lower bound ``f_star``.
    """
    inputs, clean, rng = _synthetic_regression(samples, features, seed)
    targets = np.tanh(clean / clean.std()) + 0.1 * rng.standard_normal(samples)
    targets = (targets - targets.mean()) / targets.std()
    readout = torch.as_tensor(rng.uniform(0.3, 1.0, groups) * rng.choice([-1, 1], groups))
    readout = readout.to(DTYPE)
    x, y = _partition(inputs, targets, 1)
    y = y.to(DTYPE)

    def batch_loss(params, batches):
        (weight,) = params
        prediction = batch_norm(x[batches] @ weight.mT) @ readout
        return 0.5 * (prediction - y[batches]).square().mean(dim=-1)

    centred = inputs - inputs.mean(axis=0)
    residual = targets - centred @ np.linalg.lstsq(centred, targets, rcond=None)[0]
    return Problem(
        name="bn-least-squares",
        description=f"BN least squares, n={samples}, d={features}, {groups} groups",
        manifolds=(PSIManifold(dim=0),),
        shapes=((groups, features),),
        batch_loss=batch_loss,
        f_star=float(0.5 * np.mean(residual**2)),
        f_star_method="certified: least-squares residual on the centred inputs (predictions "
        "lie in their column space)",
    )


def least_squares_without_bn(
    samples: int = 256, features: int = 10, groups: int = 4, seed: int = 0
) -> Problem:
    r""":math:`\frac1{2n}\|XW^\top v - y\|^2` on the inputs of :func:`bn_least_squares`,
    without BatchNorm: **not** scale invariant, for the negative control of equivariance."""
    inputs, clean, rng = _synthetic_regression(samples, features, seed)
    x = torch.as_tensor(inputs, dtype=DTYPE).unsqueeze(0)
    targets = torch.as_tensor(clean / clean.std(), dtype=DTYPE).unsqueeze(0)
    readout = torch.as_tensor(rng.uniform(0.3, 1.0, groups), dtype=DTYPE)

    def batch_loss(params, batches):
        (weight,) = params
        return 0.5 * ((x[batches] @ weight.mT) @ readout - targets[batches]).square().mean(-1)

    return Problem(
        name="least-squares-without-bn",
        description=f"least squares without BN (not scale invariant), n={samples}, "
        f"d={features}, {groups} groups",
        manifolds=(PSIManifold(dim=0),),
        shapes=((groups, features),),
        batch_loss=batch_loss,
        f_star=0.0,
        f_star_method="certified: squares are positive",
    )


def bn_logistic(
    samples: int = 256, features: int = 10, groups: int = 3, num_batches: int = 1, seed: int = 1
) -> Problem:
    r""":math:`\frac1n\sum_i \log(1 + \exp(-y_i\, \operatorname{BN}(XW^\top)_i v))`, labels
    from a noisy linear teacher; ``f_star = 0`` (the loss is positive)."""
    inputs, clean, rng = _synthetic_regression(samples, features, seed)
    labels = np.where(clean + 0.5 * clean.std() * rng.standard_normal(samples) > 0, 1.0, -1.0)
    readout = torch.as_tensor(rng.uniform(0.5, 1.5, groups), dtype=DTYPE)
    x, y = _partition(inputs, labels, num_batches)
    y = y.to(DTYPE)

    def batch_loss(params, batches):
        (weight,) = params
        margins = y[batches] * (batch_norm(x[batches] @ weight.mT) @ readout)
        return torch.nn.functional.softplus(-margins).mean(dim=-1)

    suffix = "" if num_batches == 1 else "-minibatch"
    return Problem(
        name=f"bn-logistic{suffix}",
        description=f"BN logistic regression, n={samples}, d={features}, {groups} groups, "
        f"{num_batches} batch(es)",
        manifolds=(PSIManifold(dim=0),),
        shapes=((groups, features),),
        batch_loss=batch_loss,
        f_star=0.0,
        f_star_method="certified: the logistic loss is positive",
        num_batches=num_batches,
    )


def _digits(samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``samples`` of scikit-learn's bundled 8x8 digits (1797 images, no download) as
    ``(samples, 64)`` pixels, each standardized over these samples (constant pixels are only
    centred), and their labels."""
    from sklearn.datasets import load_digits

    inputs, targets = load_digits(return_X_y=True)
    inputs, targets = inputs[:samples], targets[:samples]
    spread = inputs.std(axis=0)
    spread[spread == 0] = 1.0
    return (inputs - inputs.mean(axis=0)) / spread, targets


def mlp_digits(
    samples: int = 512, hidden: int = 32, num_batches: int = 1, temperature: float = 3.0
) -> Problem:
    r"""Digits → :math:`W_1` → BN → tanh → :math:`W_2` → BN → :math:`\gamma\,\cdot` →
    cross-entropy on the first ``samples`` digits (:func:`_digits`); ``f_star = 0``."""
    x, y = _partition(*_digits(samples), num_batches)

    def batch_loss(params, batches):
        first, second = params
        hidden_units = torch.tanh(batch_norm(x[batches] @ first.mT))
        logits = temperature * batch_norm(hidden_units @ second.mT)
        labels = y[batches]
        return (
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
            )
            .reshape(labels.shape)
            .mean(dim=-1)
        )

    suffix = "" if num_batches == 1 else "-minibatch"
    return Problem(
        name=f"mlp-digits{suffix}",
        description=f"BN MLP 64-{hidden}-10 on {samples} digits, {num_batches} batch(es)",
        manifolds=(PSIManifold(dim=0), PSIManifold(dim=0)),
        shapes=((hidden, x.shape[-1]), (10, hidden)),
        batch_loss=batch_loss,
        f_star=0.0,
        f_star_method="certified: cross-entropy is positive",
        num_batches=num_batches,
    )
