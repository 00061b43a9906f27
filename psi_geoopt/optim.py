r"""Drop-in Riemannian optimizers whose iterates are equivariant from the first step.

geoopt's :class:`geoopt.optim.RiemannianSGD` starts its momentum buffer from the raw Euclidean
gradient, before weight decay and before :meth:`~geoopt.Manifold.egrad2rgrad`. On a PSI
parameter that buffer is not horizontal and scales as :math:`1/c` when the point is rescaled by
:math:`c`, while every later term scales as :math:`c`: equivalent starting points then follow
non-equivalent trajectories. :class:`RiemannianSGD` below is geoopt's optimizer with that one
line changed (the buffer starts from the Riemannian gradient, as :class:`torch.optim.SGD`'s
starts from the gradient), and it no longer writes weight decay into ``p.grad``.
"""

from __future__ import annotations

import geoopt
import torch
from geoopt import ManifoldParameter, ManifoldTensor

__all__ = ["RiemannianSGD"]


class RiemannianSGD(geoopt.optim.RiemannianSGD):
    r"""Riemannian SGD with momentum, Nesterov and weight decay, equivariant on PSI parameters.

    Same constructor, hyper-parameters and state format as
    :class:`geoopt.optim.RiemannianSGD`. For a parameter :math:`x` on manifold
    :math:`\mathcal{M}` and step :math:`t`:

    .. math::

        \begin{aligned}
            g_t &= \operatorname{egrad2rgrad}_{x_t}(\nabla f(x_t) + \lambda x_t) \\
            b_t &= \begin{cases} g_t & t = 1 \\
                   \mu\, \mathcal{T}_{x_{t-1} \to x_t}(b_{t-1}) + (1 - \tau) g_t & t > 1
                   \end{cases} \\
            d_t &= g_t + \mu b_t \ \text{(Nesterov)} \quad\text{or}\quad d_t = b_t \\
            x_{t+1}, \mathcal{T}(b_t) &= \operatorname{retr\_transp}_{x_t}(-\eta\, d_t, b_t)
        \end{aligned}

    with learning rate :math:`\eta`, momentum :math:`\mu`, dampening :math:`\tau` and weight
    decay :math:`\lambda`. Without momentum :math:`x_{t+1} = \operatorname{retr}_{x_t}(-\eta
    g_t)`. On a PSI parameter the weight-decay term is radial and removed by the projection.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            weight_decay = group["weight_decay"]
            momentum = group["momentum"]
            dampening = group["dampening"]
            nesterov = group["nesterov"]
            learning_rate = group["lr"]
            for point in group["params"]:
                grad = point.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(
                        "RiemannianSGD does not support sparse gradients, use "
                        "SparseRiemannianSGD instead"
                    )
                if isinstance(point, (ManifoldParameter, ManifoldTensor)):
                    manifold = point.manifold
                else:
                    manifold = self._default_manifold
                if weight_decay != 0:
                    grad = grad.add(point, alpha=weight_decay)
                rgrad = manifold.egrad2rgrad(point, grad)
                if momentum == 0:
                    point.copy_(manifold.retr(point, -learning_rate * rgrad))
                    continue
                state = self.state[point]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = rgrad.clone()
                else:
                    buffer.mul_(momentum).add_(rgrad, alpha=1 - dampening)
                direction = rgrad.add(buffer, alpha=momentum) if nesterov else buffer
                new_point, new_buffer = manifold.retr_transp(
                    point, -learning_rate * direction, buffer
                )
                buffer.copy_(new_buffer)
                point.copy_(new_point)
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self.stabilize_group(group)
        return loss
