"""Drop-in Riemannian optimizers whose iterates are equivariant from the first step.

:class:`RiemannianSGD` (:mod:`.rsgd`) and :class:`RiemannianAdam` (:mod:`.radam`) take the
steps of geoopt's optimizers, with a fast path for :class:`~psi_geoopt.PSIManifold` parameters
whose arithmetic, in every backend (:mod:`.kernels`), comes from the closed forms of
:mod:`._closed_form`. :class:`SparseRiemannianSGD` and :class:`SparseRiemannianAdam`
(:mod:`.sparse`) are geoopt's sparse optimizers, refusing the PSI parameters they would get
wrong.
"""

from ._fused import AUTO_COMPILE_NUMEL
from .radam import RiemannianAdam
from .rsgd import RiemannianSGD
from .sparse import SparseRiemannianAdam, SparseRiemannianSGD

__all__ = [
    "AUTO_COMPILE_NUMEL",
    "RiemannianAdam",
    "RiemannianSGD",
    "SparseRiemannianAdam",
    "SparseRiemannianSGD",
]
