r"""The optimizers the experiments compare, by name: PSI, Euclidean and the two closest neighbours.

Every entry builds its optimizer for a model whose positively scale-invariant (PSI) weights
are known (the dictionary returned by :func:`psi_geoopt.find_scale_invariant`, name → group
axis) and, where needed, first changes the model's parameters in place:

==================== ======================================================= ============ ======
name                 update                                                  weight decay ref. lr
==================== ======================================================= ============ ======
``psi-sgd``          :class:`psi_geoopt.optim.RiemannianSGD` on PSI weights   none         0.3
``psi-sgd-momentum`` the same, momentum 0.9                                  5e-4 [#wd]_  0.03
``psi-adam``         :class:`psi_geoopt.optim.RiemannianAdam` on PSI weights  5e-4 [#wd]_  0.01
``sgd``              :class:`torch.optim.SGD`                                none         0.3
``sgd-momentum``     :class:`torch.optim.SGD`, momentum 0.9                  5e-4         0.03
``adamw``            :class:`torch.optim.AdamW`                              1e-2         3e-3
``sgdp``             ``adamp.SGDP`` (Heo et al., 2021), momentum 0.9          5e-4         0.03
``adamp``            ``adamp.AdamP``                                         1e-2         3e-3
``sphere``           :class:`geoopt.Sphere` on unit-norm PSI weights,         5e-4 [#wd]_  0.03
                     :class:`psi_geoopt.optim.RiemannianSGD`, momentum 0.9
==================== ======================================================= ============ ======

.. [#wd] on the parameters that are not PSI only (BN affine parameters, classifier):
   :func:`psi_geoopt.param_groups` puts PSI weights in a group without weight decay, where it
   would be radial and removed by the projection anyway.

PSI weights become :class:`geoopt.ManifoldParameter` on :class:`~psi_geoopt.PSIManifold` via
:func:`psi_geoopt.to_psi`; the other parameters stay Euclidean in the same optimizer. For
``sphere`` each PSI group :math:`w` is stored as a unit row :math:`w / \|w\|` of a matrix
on :class:`geoopt.Sphere` (a parametrization reshapes it back to the layer's weight); the
network computes the same function in training mode, since the group is scale invariant. PSI
Riemannian SGD is equivariant, so from any representative it takes the steps that Riemannian
SGD on the sphere takes from the unit one: ``sphere`` should match ``psi-sgd-momentum`` up to
BatchNorm's epsilon and rounding.

The reference learning rate is the centre of the default learning-rate grid of
``psi-geoopt compare``, chosen on ``mlp-bn``/digits at the default initialization (seed 0, 300
steps, a sweep over 1e-3 … 3). For ``psi-adam`` the second-moment estimate is one value per
group (geoopt's ``component_inner``), so its learning rate is an angle per step, like PSI
SGD's, rather than a per-coordinate step as in Adam; hence its larger reference value.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import geoopt
import torch
from torch import nn
from torch.nn.utils import parametrize

import psi_geoopt
from psi_geoopt.optim import RiemannianAdam, RiemannianSGD

__all__ = ["OPTIMIZERS", "OptimizerSpec", "build_optimizer", "is_installed", "missing_packages"]

SGD_WEIGHT_DECAY = 5e-4
ADAM_WEIGHT_DECAY = 1e-2
MOMENTUM = 0.9

ScaleInvariant = dict[str, int | None]
Builder = Callable[[nn.Module, ScaleInvariant, torch.Tensor, float], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    """One comparable optimizer: its name, how to build it, its reference learning rate and the
    optional package it needs (``None``: only the package's own dependencies)."""

    name: str
    build: Builder
    reference_lr: float
    requires: str | None = None


def _to_psi(model: nn.Module, scale_invariant: ScaleInvariant, example_inputs: torch.Tensor):
    psi_geoopt.to_psi(model, example_inputs, names=scale_invariant, check=False)


def _psi_sgd(momentum: float, weight_decay: float) -> Builder:
    def build(model, scale_invariant, example_inputs, lr):
        _to_psi(model, scale_invariant, example_inputs)
        groups = psi_geoopt.param_groups(model, weight_decay=weight_decay)
        return RiemannianSGD(groups, lr=lr, momentum=momentum)

    return build


def _psi_adam(model, scale_invariant, example_inputs, lr):
    _to_psi(model, scale_invariant, example_inputs)
    groups = psi_geoopt.param_groups(model, weight_decay=SGD_WEIGHT_DECAY)
    return RiemannianAdam(groups, lr=lr)


def _sgd(momentum: float, weight_decay: float) -> Builder:
    def build(model, scale_invariant, example_inputs, lr):
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )

    return build


def _adamw(model, scale_invariant, example_inputs, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ADAM_WEIGHT_DECAY)


def _sgdp(model, scale_invariant, example_inputs, lr):
    from adamp import SGDP

    return SGDP(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=SGD_WEIGHT_DECAY)


def _adamp(model, scale_invariant, example_inputs, lr):
    from adamp import AdamP

    return AdamP(model.parameters(), lr=lr, weight_decay=ADAM_WEIGHT_DECAY)


class _GroupRows(nn.Module):
    """Parametrization storing a weight as one row per group (axis ``dim`` first, flattened)."""

    def __init__(self, shape: torch.Size, dim: int | None):
        super().__init__()
        self.dim = None if dim is None else dim % len(shape)
        self.moved_shape = shape
        if self.dim is not None:
            axis = self.dim
            self.moved_shape = torch.Size([shape[axis], *shape[:axis], *shape[axis + 1 :]])

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        weight = rows.reshape(self.moved_shape)
        return weight if self.dim is None else weight.movedim(0, self.dim)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dim is None:
            return weight.reshape(1, -1)
        return weight.movedim(self.dim, 0).reshape(weight.shape[self.dim], -1)


def to_unit_sphere(model: nn.Module, scale_invariant: ScaleInvariant) -> None:
    r"""Store every PSI weight group of ``model`` as a unit-norm row on :class:`geoopt.Sphere`.

    The weight named ``name`` with group axis ``dim`` becomes the parametrization of a matrix
    :math:`R` with one row :math:`w_k / \|w_k\|` per group, a :class:`geoopt.ManifoldParameter`
    on the sphere; groups on axis ``dim=None`` are one row.
    """
    for name, dim in scale_invariant.items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, attribute)
        parametrize.register_parametrization(
            module, attribute, _GroupRows(weight.shape, dim), unsafe=True
        )
        parametrization = module.parametrizations[attribute]
        rows = parametrization.original.detach()
        parametrization.original = geoopt.ManifoldParameter(
            rows / rows.norm(dim=1, keepdim=True), manifold=geoopt.Sphere()
        )


def _sphere(model, scale_invariant, example_inputs, lr):
    to_unit_sphere(model, scale_invariant)
    on_sphere = [p for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    euclidean = [p for p in model.parameters() if not isinstance(p, geoopt.ManifoldParameter)]
    groups = [
        {"params": euclidean, "weight_decay": SGD_WEIGHT_DECAY},
        {"params": on_sphere, "weight_decay": 0.0},
    ]
    return RiemannianSGD(groups, lr=lr, momentum=MOMENTUM)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("psi-sgd", _psi_sgd(0.0, 0.0), 0.3),
        OptimizerSpec("psi-sgd-momentum", _psi_sgd(MOMENTUM, SGD_WEIGHT_DECAY), 0.03),
        OptimizerSpec("psi-adam", _psi_adam, 0.01),
        OptimizerSpec("sgd", _sgd(0.0, 0.0), 0.3),
        OptimizerSpec("sgd-momentum", _sgd(MOMENTUM, SGD_WEIGHT_DECAY), 0.03),
        OptimizerSpec("adamw", _adamw, 3e-3),
        OptimizerSpec("sgdp", _sgdp, 0.03, requires="adamp"),
        OptimizerSpec("adamp", _adamp, 3e-3, requires="adamp"),
        OptimizerSpec("sphere", _sphere, 0.03),
    )
}


def is_installed(package: str) -> bool:
    """Whether ``package`` can be imported."""
    return importlib.util.find_spec(package) is not None


def missing_packages(names: Iterable[str]) -> dict[str, str]:
    """The optimizers among ``names`` whose optional package is not installed → that package."""
    return {
        name: OPTIMIZERS[name].requires
        for name in names
        if OPTIMIZERS[name].requires is not None and not is_installed(OPTIMIZERS[name].requires)
    }


def build_optimizer(
    name: str,
    model: nn.Module,
    scale_invariant: ScaleInvariant,
    example_inputs: torch.Tensor,
    lr: float,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a key of :data:`OPTIMIZERS`) for ``model``, converting it first.

    ``scale_invariant`` maps the PSI weights' names to their group axes, as returned by
    :func:`psi_geoopt.find_scale_invariant`; ``example_inputs`` is a training batch.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"`lr` must be positive, got {lr!r}")
    missing = missing_packages([name])
    if missing:
        raise ImportError(
            f"optimizer {name!r} needs the package {missing[name]!r}: pip install {missing[name]}"
        )
    return OPTIMIZERS[name].build(model, scale_invariant, example_inputs, lr)
