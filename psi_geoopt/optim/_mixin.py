"""What the optimizers share: ``foreach`` and ``compile`` as options of each parameter group,
as in :mod:`torch.optim`, the parameters a step takes, and a ``stabilize`` that checks the
points."""

from __future__ import annotations

from typing import Any

import torch
from geoopt import ManifoldParameter, ManifoldTensor

__all__ = ["FastPathMixin", "StabilizeChecksPoints"]

OPTIONS = ("foreach", "compile")


class FastPathMixin:
    """Mixin of the optimizers: ``foreach`` and ``compile`` are constructor defaults stored in
    every parameter group (a group may set its own), so that they travel with ``state_dict``
    and pickles, as :class:`torch.optim.SGD`'s ``foreach`` does. Groups saved without them
    (older checkpoints and pickles) take the optimizer's defaults, else ``None``."""

    def _set_default_options(self, **options: bool | None) -> None:
        """Make ``options`` defaults, given to the groups that do not set their own; called at
        the end of ``__init__``, once the base classes have made the groups."""
        self.defaults.update(options)
        for group in self.param_groups:
            self._fill_options(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as :meth:`torch.optim.Optimizer.add_param_group` does; a
        group that does not set ``foreach`` or ``compile`` takes the optimizer's defaults."""
        super().add_param_group(param_group)
        self._fill_options(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key in OPTIONS:
            self.defaults.setdefault(key, None)
        for group in self.param_groups:
            self._fill_options(group)

    def _fill_options(self, group: dict[str, Any]) -> None:
        for key in OPTIONS:
            if key in self.defaults:
                group.setdefault(key, self.defaults[key])
            value = group.get(key)
            if value is not None and not isinstance(value, bool):
                raise TypeError(
                    f"{type(self).__name__}: `{key}` must be a bool or None, got {value!r}"
                )

    def _params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The parameters of ``group`` that have a gradient; a sparse one is refused, as by
        geoopt's optimizers."""
        params = []
        for point in group["params"]:
            if point.grad is None:
                continue
            if point.grad.is_sparse:
                name = type(self).__name__
                raise RuntimeError(
                    f"{name} does not support sparse gradients, use Sparse{name} instead"
                )
            params.append(point)
        return params


class StabilizeChecksPoints:
    """Mixin for geoopt optimizers: ``stabilize_group`` first runs
    :meth:`~geoopt.Manifold.assert_check_point` on every manifold parameter of the group.

    geoopt's ``stabilize_group`` calls :meth:`~geoopt.Manifold.projx`, which on
    :class:`~psi_geoopt.PSIManifold` does not read the values (it runs at every step of geoopt's
    ``RiemannianAdam``); with this mixin ``stabilize=N`` raises a ``ValueError`` naming the zero
    or non-finite groups every ``N`` steps instead of training on from a bad point.
    """

    @torch.no_grad()
    def stabilize_group(self, group: dict) -> None:
        for point in group["params"]:
            if isinstance(point, (ManifoldParameter, ManifoldTensor)):
                point.manifold.assert_check_point(point)
        super().stabilize_group(group)
