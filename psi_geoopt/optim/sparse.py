r"""geoopt's sparse Riemannian optimizers, refusing the PSI parameters they would get wrong.

:class:`geoopt.optim.SparseRiemannianSGD` and :class:`geoopt.optim.SparseRiemannianAdam` update
only the rows of a matrix parameter (indices of axis 0) that have a gradient: they apply the
manifold's operations to ``point[rows]`` and write the result back. On
:class:`~psi_geoopt.PSIManifold` that is the Riemannian step only if every group lies inside one
row:

* ``PSIManifold(dim=0)`` (one group per row) and any ``PSIManifold(dim, ndim=1)`` (one point per
  row, axis 0 a batch axis) qualify;
* ``PSIManifold(dim=None)`` (one group made of the whole matrix) and ``PSIManifold(dim=1)`` (one
  group per column) do not: the rows selected from a group would be projected, retracted and
  transported as if they were the whole group (the radial part removed from them alone, the
  metric read from their norm alone), which is not the Riemannian step of that group.

geoopt's own classes take such parameters without a word; the subclasses below refuse them
with a ``ValueError`` naming the parameter (the same for :class:`geoopt.Scaled` around a
``PSIManifold``). They also check the points when ``stabilize`` is due
(:class:`~psi_geoopt.optim._mixin.StabilizeChecksPoints`), since :meth:`PSIManifold.projx` does not.
"""

from __future__ import annotations

import geoopt
import torch
from geoopt import ManifoldParameter, ManifoldTensor

from ..manifold import PSIManifold
from ._mixin import StabilizeChecksPoints

__all__ = ["SparseRiemannianAdam", "SparseRiemannianSGD", "rows_hold_whole_groups"]


def _psi_manifold(manifold: geoopt.Manifold) -> PSIManifold | None:
    """The :class:`PSIManifold` under ``manifold`` (itself or inside :class:`geoopt.Scaled`)."""
    while isinstance(manifold, geoopt.Scaled):
        manifold = manifold.base
    return manifold if isinstance(manifold, PSIManifold) else None


def rows_hold_whole_groups(manifold: PSIManifold, rank: int) -> bool:
    """Whether every group of a rank-``rank`` tensor on ``manifold`` lies inside one index of
    axis 0: axis 0 is a batch axis (``ndim < rank``) or the group axis of the point."""
    point_rank = rank if manifold.ndim is None else manifold.ndim
    if point_rank < rank:
        return True
    return manifold.dim is not None and manifold.dim % point_rank == 0


class _RowwiseOnly:
    """Mixin for geoopt's sparse optimizers: refuse PSI parameters whose groups span rows."""

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # geoopt refuses sets (unordered) itself
            params = param_group["params"] = list(params)
        for index, point in enumerate(params):
            if not isinstance(point, (ManifoldParameter, ManifoldTensor)):
                continue  # geoopt steps it on the Euclidean manifold
            manifold = _psi_manifold(point.manifold)
            if manifold is None or rows_hold_whole_groups(manifold, point.dim()):
                continue
            raise ValueError(
                f"{type(self).__name__}: parameter {index} of parameter group "
                f"{len(self.param_groups)} (shape {tuple(point.shape)}, on {manifold}) has PSI "
                "groups that span several rows; a sparse step updates the rows that have a "
                "gradient one by one and would get these groups wrong. Use PSIManifold(dim=0) "
                "for one group per row, PSIManifold(dim=None, ndim=1) for one point per row, "
                "or dense gradients with psi_geoopt.optim.RiemannianSGD / RiemannianAdam"
            )
        super().add_param_group(param_group)


class SparseRiemannianSGD(_RowwiseOnly, StabilizeChecksPoints, geoopt.optim.SparseRiemannianSGD):
    r""":class:`geoopt.optim.SparseRiemannianSGD` that refuses PSI parameters whose groups span
    several rows.

    Same constructor and step. The step of the rows :math:`R` that have a gradient is geoopt's,

    .. math::

        x_R \leftarrow \operatorname{retr}_{x_R}(-\eta\, d_R), \qquad
        d_R = \mathrm{egrad2rgrad}_{x_R}(\nabla_R f) \text{ (with momentum: its
        transported average)},

    which is the Riemannian step of every group touched only if each group lies inside one row
    (:func:`rows_hold_whole_groups`); other PSI parameters raise a ``ValueError`` at
    construction (or in :meth:`add_param_group`). ``stabilize`` also checks the points
    (:class:`~psi_geoopt.optim._mixin.StabilizeChecksPoints`).
    """


class SparseRiemannianAdam(_RowwiseOnly, StabilizeChecksPoints, geoopt.optim.SparseRiemannianAdam):
    r""":class:`geoopt.optim.SparseRiemannianAdam` that refuses PSI parameters whose groups span
    several rows.

    Same constructor and step: the rows :math:`R` that have a gradient take geoopt's Riemannian
    Adam step, whose second moment is :meth:`~psi_geoopt.PSIManifold.component_inner`, one value
    per group. That is the Adam step of every group touched only if each group lies inside one
    row (:func:`rows_hold_whole_groups`); other PSI parameters raise a ``ValueError`` at
    construction (or in :meth:`add_param_group`). ``stabilize`` also checks the points
    (:class:`~psi_geoopt.optim._mixin.StabilizeChecksPoints`).
    """
