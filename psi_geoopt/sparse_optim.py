r"""Optimizer parts shared by :mod:`psi_geoopt.optim`.

:class:`StabilizeChecksPoints`: geoopt's ``stabilize`` option calls
:meth:`~geoopt.Manifold.projx`, which on :class:`~psi_geoopt.PSIManifold` reads no values (it runs
at every step of geoopt's ``RiemannianAdam``); the mixin makes ``stabilize`` check the points.
"""

from __future__ import annotations

import torch
from geoopt import ManifoldParameter, ManifoldTensor

__all__ = ["StabilizeChecksPoints"]


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
