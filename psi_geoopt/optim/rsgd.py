r"""Riemannian SGD: the optimizer, its reference loop and its fast path.

geoopt's :class:`geoopt.optim.RiemannianSGD` starts its momentum buffer from the raw Euclidean
gradient, before weight decay and before :meth:`~geoopt.Manifold.egrad2rgrad`. On a PSI
parameter that buffer is not horizontal and scales as :math:`1/c` when the point is rescaled by
:math:`c`, while every later term scales as :math:`c`: equivalent starting points then follow
non-equivalent trajectories. :class:`RiemannianSGD` is geoopt's optimizer with that one line
changed (the buffer starts from the Riemannian gradient, as :class:`torch.optim.SGD`'s starts
from the gradient), and it does not write weight decay into ``p.grad``.

Two implementations of the same step live side by side, as in :mod:`torch.optim.sgd`, with one
signature: :func:`_single_tensor_rsgd`, the reference loop calling the manifold's operations
parameter by parameter, and :func:`_multi_tensor_rsgd`, the fast path: ``foreach`` operations
for the Euclidean parameters, and for PSI parameters the fused step of :mod:`._fused` (closed
forms from five per-group sums, :mod:`._closed_form`, run by the Triton kernel on CUDA, the
Numba loop on CPU, :func:`torch.compile` or eager operations).
"""

from __future__ import annotations

import geoopt
import torch

from ._fused import _fused_group_size, _local, _manifold_of, psi_sgd
from ._mixin import FastPathMixin, StabilizeChecksPoints

__all__ = ["RiemannianSGD"]


class RiemannianSGD(FastPathMixin, StabilizeChecksPoints, geoopt.optim.RiemannianSGD):
    r"""Riemannian SGD with momentum, Nesterov and weight decay, equivariant on PSI parameters.

    Same constructor, hyper-parameters and state format as
    :class:`geoopt.optim.RiemannianSGD`, and the group options ``foreach`` and ``compile``.
    For parameters :math:`x` on a manifold :math:`\mathcal{M}`:

    .. math::
       \begin{aligned}
            &\rule{30em}{0.4pt}                                                                  \\
            &\textbf{input}      : \eta \text{ (lr)}, \: x_0 \in \mathcal{M} \text{ (params)},
                \: f(x) \text{ (objective)}, \: \lambda \text{ (weight decay)},                   \\
            &\hspace{13mm} \:\mu \text{ (momentum)}, \:\tau \text{ (dampening)},
                \:\textit{ nesterov}                                                      \\[-1.ex]
            &\rule{30em}{0.4pt}                                                                  \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \mathrm{egrad2rgrad}_{x_{t-1}}
                \big(\nabla f(x_{t-1}) + \lambda x_{t-1}\big)                                    \\
            &\hspace{5mm}\textbf{if} \: \mu \neq 0                                               \\
            &\hspace{10mm}\textbf{if} \: t > 1                                                   \\
            &\hspace{15mm} b_t \leftarrow \mu\, \tilde b_{t-1} + (1-\tau) g_t                    \\
            &\hspace{10mm}\textbf{else}                                                          \\
            &\hspace{15mm} b_t \leftarrow g_t                                                    \\
            &\hspace{10mm}\textbf{if} \: \textit{nesterov}                                       \\
            &\hspace{15mm} d_t \leftarrow g_t + \mu b_t                                          \\
            &\hspace{10mm}\textbf{else}                                                          \\
            &\hspace{15mm} d_t \leftarrow b_t                                                    \\
            &\hspace{10mm} x_t, \tilde b_t \leftarrow
                \mathrm{retr\_transp}_{x_{t-1}}(-\eta\, d_t, b_t)                                \\
            &\hspace{5mm}\textbf{else}                                                           \\
            &\hspace{10mm} x_t \leftarrow \operatorname{retr}_{x_{t-1}}(-\eta\, g_t)             \\
            &\rule{30em}{0.4pt}                                                           \\[-1.ex]
            &\textbf{return} \: x_t                                                       \\[-1.ex]
            &\rule{30em}{0.4pt}                                                           \\[-1.ex]
       \end{aligned}

    :math:`\tilde b_{t-1}` is the buffer transported to :math:`x_{t-1}`; the state
    ``momentum_buffer`` holds it. geoopt's starts it at :math:`b_1 = \nabla f(x_0)`, before
    ``egrad2rgrad``. On a PSI parameter the weight-decay term is radial and removed by the
    projection.

    Parameters
    ----------
    params : iterable
        parameters, or dicts defining parameter groups.
    lr, momentum, dampening, weight_decay, nesterov, stabilize
        as for :class:`geoopt.optim.RiemannianSGD`.
    foreach : bool or None
        ``None`` (default) or ``True``: the fast path — ``torch._foreach_*`` operations over
        the plain (Euclidean) parameters of a group, as :class:`torch.optim.SGD` with
        ``foreach=True``, and closed-form updates (two memory passes, the per-group scalar
        algebra batched across tensors) for contiguous :class:`~psi_geoopt.PSIManifold`
        parameters grouped along their first axis (``dim=0``, or ``dim=None``); every other
        parameter (other manifolds, other group axes, non-contiguous tensors) goes through
        the reference loop. ``False``: the reference loop for every parameter. Both compute
        the same step up to rounding. A parameter that is not a
        :class:`geoopt.ManifoldParameter` but has an attribute ``manifold`` is treated as a
        point of that manifold: FSDP2's ``fully_shard`` replaces parameters by plain
        ``DTensor`` parameters, and setting ``p.manifold`` again afterwards keeps them on PSI;
        sharded along axis 0, each group lives on one rank and the fast path updates the
        local rows without communication.
    compile : bool or None
        run the fused PSI step as compiled code rather than eager operations. ``None``
        (default):

        * on CUDA (with Triton, which PyTorch's CUDA builds on Linux bring): one launch of
          the multi-tensor kernel of :mod:`psi_geoopt.optim.kernels.triton` per parameter
          group, for groups of at most ``MAX_ROW`` elements;
        * on CPU (where Numba, a dependency, can be imported): one call per tensor of the
          compiled loop of :mod:`psi_geoopt.optim.kernels.numba` (compiled at the first step
          and cached on disk), the fastest CPU path at every size measured, from the demo
          ConvNet to ResNet-50 (``benchmarks/RESULTS.md``);
        * elsewhere, for the groups whose fused PSI parameters hold at least
          :data:`~psi_geoopt.optim.AUTO_COMPILE_NUMEL` elements together:
          :func:`torch.compile`, one graph per parameter group, specialised to its shapes, in
          which the per-group sums and the update of every tensor are fused (and, where
          inductor supports it, independent tensors share kernels); compilation happens at
          the second step and takes tens of seconds; where it fails, the step runs eagerly,
          with a warning. Smaller groups run eagerly.

        ``True``: the Triton kernel on CUDA, :func:`torch.compile` elsewhere, for every
        size. ``False``: never, eager operations everywhere.

    ``foreach`` and ``compile`` are stored in every parameter group (a group may set its own)
    and, as every group option, saved by ``state_dict`` and restored by ``load_state_dict``.
    """

    def __init__(
        self,
        params,
        lr,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        stabilize=None,
        *,
        foreach: bool | None = None,
        compile: bool | None = None,
    ):
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            stabilize=stabilize,
        )
        self._set_default_options(foreach=foreach, compile=compile)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            params = self._params_with_grad(group)
            step = _single_tensor_rsgd if group["foreach"] is False else _multi_tensor_rsgd
            step(
                params,
                self.state,
                self._default_manifold,
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                lr=group["lr"],
                compile=group["compile"],
            )
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self.stabilize_group(group)
        return loss


def _single_tensor_rsgd(
    params: list[torch.Tensor],
    state: dict,
    default_manifold: geoopt.Manifold,
    *,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    lr: float,
    compile: bool | None = None,
) -> None:
    """The reference step: the manifold's operations, one parameter at a time (``compile`` is
    not used: the signature is :func:`_multi_tensor_rsgd`'s)."""
    for point in params:
        manifold = _manifold_of(point, default_manifold)
        grad = point.grad
        if weight_decay != 0:
            grad = grad.add(point, alpha=weight_decay)
        rgrad = manifold.egrad2rgrad(point, grad)
        if momentum == 0:
            point.copy_(manifold.retr(point, -lr * rgrad))
            continue
        param_state = state[point]
        buffer = param_state.get("momentum_buffer")
        if buffer is None:
            buffer = param_state["momentum_buffer"] = rgrad.clone()
        else:
            buffer.mul_(momentum).add_(rgrad, alpha=1 - dampening)
        direction = rgrad.add(buffer, alpha=momentum) if nesterov else buffer
        new_point, new_buffer = manifold.retr_transp(point, -lr * direction, buffer)
        buffer.copy_(new_buffer)
        point.copy_(new_point)


def _multi_tensor_rsgd(
    params: list[torch.Tensor],
    state: dict,
    default_manifold: geoopt.Manifold,
    *,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    lr: float,
    compile: bool | None = None,
) -> None:
    """The fast step: the same update as :func:`_single_tensor_rsgd`.

    Euclidean parameters take ``torch._foreach_*`` operations (as ``torch.optim.SGD`` with
    ``foreach=True``, without writing into ``p.grad``), parameters on
    :class:`~psi_geoopt.PSIManifold` grouped along axis 0 the fused step
    (:func:`._fused.psi_sgd`, on the backend ``compile`` selects), every other parameter the
    reference loop.
    """
    euclidean, fused, other = [], [], []
    for point in params:
        manifold = _manifold_of(point, default_manifold)
        if type(manifold) is geoopt.Euclidean:
            euclidean.append(point)
            continue
        group_size = _fused_group_size(point, manifold)
        if group_size is None:
            other.append(point)
            continue
        buffer, first = None, False
        if momentum != 0:
            param_state = state[point]
            buffer = param_state.get("momentum_buffer")
            if buffer is None:
                buffer = param_state["momentum_buffer"] = torch.zeros_like(point)
                first = True
            elif not _local(buffer).is_contiguous():
                other.append(point)
                continue
        fused.append((point, buffer, group_size, first))
    hyper = dict(weight_decay=weight_decay, momentum=momentum, dampening=dampening, lr=lr)
    if fused:
        psi_sgd(
            fused, compile=compile, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov
        )
    if other:
        _single_tensor_rsgd(other, state, default_manifold, nesterov=nesterov, **hyper)
    if euclidean:
        _foreach_euclidean_sgd(euclidean, state, nesterov=nesterov, **hyper)


def _foreach_euclidean_sgd(
    params: list[torch.Tensor],
    state: dict,
    *,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    lr: float,
) -> None:
    """``torch.optim.SGD``'s multi-tensor step, leaving ``p.grad`` untouched."""
    grads = [p.grad for p in params]
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        running, running_grads = [], []
        for point, grad in zip(params, grads, strict=True):
            param_state = state[point]
            if param_state.get("momentum_buffer") is None:
                param_state["momentum_buffer"] = grad.clone()
            else:
                running.append(param_state["momentum_buffer"])
                running_grads.append(grad)
        if running:
            torch._foreach_mul_(running, momentum)
            torch._foreach_add_(running, running_grads, alpha=1 - dampening)
        buffers = [state[p]["momentum_buffer"] for p in params]
        grads = torch._foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers
    torch._foreach_add_(params, grads, alpha=-lr)
