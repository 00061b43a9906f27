"""psi_geoopt: train batch-normalized networks on the positive-scale-invariant (PSI) manifold."""

from . import optim
from .manifold import PSIManifold

__all__ = ["PSIManifold", "optim"]
__version__ = "0.1.0"
