"""psi_geoopt: train batch-normalized networks on the positive-scale-invariant (PSI) manifold."""

from . import optim
from .convert import explain_scale_invariance, find_scale_invariant, param_groups, to_psi
from .manifold import PSIManifold

__all__ = [
    "PSIManifold",
    "explain_scale_invariance",
    "find_scale_invariant",
    "optim",
    "param_groups",
    "to_psi",
]
__version__ = "0.1.0"
