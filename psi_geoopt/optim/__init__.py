r"""Drop-in Riemannian optimizers whose iterates are equivariant from the first step.

geoopt's :class:`geoopt.optim.RiemannianSGD` starts its momentum buffer from the raw Euclidean
gradient, before weight decay and before :meth:`~geoopt.Manifold.egrad2rgrad`. On a PSI
parameter that buffer is not horizontal and scales as :math:`1/c` when the point is rescaled by
:math:`c`, while every later term scales as :math:`c`: equivalent starting points then follow
non-equivalent trajectories. :class:`RiemannianSGD` below is geoopt's optimizer with that one
line changed (the buffer starts from the Riemannian gradient, as :class:`torch.optim.SGD`'s
starts from the gradient), and it no longer writes weight decay into ``p.grad``.

:class:`RiemannianAdam` is geoopt's :class:`geoopt.optim.RiemannianAdam` with one fix for
checkpoints: :meth:`torch.optim.Adam.__setstate__`, which ``load_state_dict`` calls, turns
geoopt's integer ``state["step"]`` into a float32 tensor, and the bias corrections
:math:`1 - \beta^t` computed from it differ in the last bits from those of the uninterrupted
run. Here the step stays an integer, so a resumed run is bit-identical. It also has a fast
path for PSI parameters (:func:`_psi_adam`), built on the same closed forms, and one with
``foreach`` operations for Euclidean parameters.

Two implementations of the same SGD step live side by side, as in :mod:`torch.optim.sgd`:
:func:`_single_tensor_rsgd`, the reference loop calling the manifold's operations parameter by
parameter, and :func:`_multi_tensor_rsgd`, the fast path (``foreach`` ops for the Euclidean
parameters; for PSI parameters closed forms derived in :func:`_psi_coefficients`: five
per-group sums and one update per tensor, run eagerly or compiled: on CPU one call per tensor
of the Numba loop of :mod:`psi_geoopt.numba_step`, or :func:`torch.compile` into one read
pass and one read-write pass; on CUDA one launch of the Triton kernel of
:mod:`psi_geoopt.triton_step` for all PSI tensors of a group).
"""

from .radam import RiemannianAdam
from .rsgd import AUTO_COMPILE_NUMEL, RiemannianSGD

__all__ = ["AUTO_COMPILE_NUMEL", "RiemannianAdam", "RiemannianSGD"]
