"""Riemannian SGD: the optimizer, its reference loop and its fast path."""

from __future__ import annotations

import geoopt
import numpy
import torch

from ._closed_form import _psi_coefficients
from ._fused import (
    _algebra_module,
    _as_tensor,
    _fused_group_size,
    _is_dtensor,
    _local,
    _manifold_of,
    _numba_step,
    _row_views,
    _takes_kernel,
    _triton_step,
    _working_copies,
    _write_back,
)
from .kernels.compiled import _compiled_psi_sgd
from .kernels.eager import _psi_apply, _stacked_sums

__all__ = ["AUTO_COMPILE_NUMEL", "RiemannianSGD"]


AUTO_COMPILE_NUMEL = 2**20
"""Size (elements of fused PSI parameters in one group) from which ``compile=None`` runs the
PSI step through :func:`torch.compile` where no kernel of its own takes it (on CPU without
Numba, on devices other than CUDA)."""


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

    Parameters
    ----------
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
          the multi-tensor kernel of :mod:`psi_geoopt.triton_step` per parameter group, for
          groups of at most ``MAX_ROW`` elements;
        * on CPU (where Numba, a dependency, can be imported): one call per tensor of the
          compiled loop of :mod:`psi_geoopt.numba_step` (compiled at the first step and
          cached on disk), the fastest CPU path at every size measured, from the demo
          ConvNet to ResNet-50 (``benchmarks/RESULTS.md``);
        * elsewhere, for the groups whose fused PSI parameters hold at least
          :data:`AUTO_COMPILE_NUMEL` elements together: :func:`torch.compile`, one graph per
          parameter group, specialised to its shapes, in which the per-group sums and the
          update of every tensor are fused (and, where inductor supports it, independent
          tensors share kernels); compilation happens at the second step and takes tens of
          seconds; where it fails, the step runs eagerly, with a warning. Smaller groups run
          eagerly.

        ``True``: the Triton kernel on CUDA, :func:`torch.compile` elsewhere, for every
        size. ``False``: never, eager operations everywhere.
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
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"RiemannianSGD: `foreach` must be a bool or None, got {foreach!r}")
        if compile is not None and not isinstance(compile, bool):
            raise TypeError(f"RiemannianSGD: `compile` must be a bool or None, got {compile!r}")
        self.foreach = foreach
        self.compile = compile

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("foreach", None)
        self.__dict__.setdefault("compile", None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            hyper = dict(
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                lr=group["lr"],
            )
            params = []
            for point in group["params"]:
                grad = point.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(
                        "RiemannianSGD does not support sparse gradients, use "
                        "SparseRiemannianSGD instead"
                    )
                params.append(point)
            if self.foreach is False:
                _single_tensor_rsgd(params, self.state, self._default_manifold, **hyper)
            else:
                _multi_tensor_rsgd(
                    params, self.state, self._default_manifold, compile=self.compile, **hyper
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
) -> None:
    """The reference step: the manifold's operations, one parameter at a time."""
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
    :class:`~psi_geoopt.PSIManifold` grouped along axis 0 one fused pass each
    (:func:`_psi_sgd`), every other parameter the reference loop.
    """
    euclidean, psi, other = [], [], []
    for point in params:
        manifold = _manifold_of(point, default_manifold)
        if type(manifold) is geoopt.Euclidean:
            euclidean.append(point)
        elif (group_size := _fused_group_size(point, manifold)) is not None:
            psi.append((point, group_size))
        else:
            other.append(point)
    hyper = dict(weight_decay=weight_decay, momentum=momentum, dampening=dampening, lr=lr)
    kernel_tasks, host = [], []
    for point, group_size in psi:
        buffer = None
        if momentum != 0:
            param_state = state[point]
            buffer = param_state.get("momentum_buffer")
            if buffer is None:
                buffer = param_state["momentum_buffer"] = torch.zeros_like(point)
                first = True
            elif not _local(buffer).is_contiguous():
                _single_tensor_rsgd([point], state, default_manifold, nesterov=nesterov, **hyper)
                continue
            else:
                first = False
        else:
            first = False
        if compile is not False and _takes_kernel(point, group_size):
            kernel_tasks.append((point, buffer, group_size, first))
        else:
            host.append((point, buffer, group_size, first))
    kernel = compile is not False
    # compile=None: the Numba loop on CPU where installed, else torch.compile for large groups
    numba_on_cpu = compile is None and _numba_step(numpy) is not None
    if compile is None:
        compile = (
            sum(p.numel() for p, *_ in host if not (numba_on_cpu and p.device.type == "cpu"))
            >= AUTO_COMPILE_NUMEL
        )
    tasks, compiled = [], []
    for point, buffer, group_size, first in host:
        by_numba = numba_on_cpu and point.device.type == "cpu"
        if compile and not first and not by_numba and not _is_dtensor(point):
            compiled.append((point, buffer, group_size))
            continue
        x = _local(point.detach())
        if x.numel() == 0:  # a rank that holds no group of this parameter
            continue
        buffer = None if buffer is None else _local(buffer)
        tasks.append((x, _local(point.grad), buffer, group_size, first))
    psi_hyper = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov)
    # the kernel first: the GPU runs it while the host prepares the other updates
    if kernel_tasks:
        _kernel_psi_sgd(kernel_tasks, **psi_hyper)
    _psi_sgd(tasks, kernel=kernel, **psi_hyper)
    if compiled:
        _compiled_psi_sgd(compiled, **psi_hyper)
    if other:
        _single_tensor_rsgd(other, state, default_manifold, nesterov=nesterov, **hyper)
    if euclidean:
        _foreach_euclidean_sgd(euclidean, state, nesterov=nesterov, **hyper)


def _kernel_psi_sgd(
    tasks: list[tuple[torch.Tensor, torch.Tensor | None, int, bool]], **hyper
) -> None:
    """The PSI step of ``(parameter, buffer, group_size, first)`` entries (contiguous, not
    sharded) in the Triton kernel, one launch per device, dtype and ``first`` flag."""
    batches: dict[tuple, list[tuple]] = {}
    for point, buffer, group_size, first in tasks:
        entry = (point, point.grad.contiguous(), buffer, group_size)
        batches.setdefault((point.device, point.dtype, first), []).append(entry)
    for (_, _, first), batch in batches.items():
        _triton_step().psi_sgd_step(batch, first=first, **hyper)


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


def _psi_sgd(
    tasks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, bool]],
    *,
    kernel: bool = True,
    **hyper,
) -> None:
    """The PSI step on ``(x, grad, buffer, group_size, first)`` entries (``x`` and ``buffer``
    contiguous, ``buffer`` ``None`` without momentum), float16/bfloat16 computed in float32.

    On CPU with Numba installed (and ``kernel``): one call of the compiled loop of
    :mod:`psi_geoopt.numba_step` per tensor. Otherwise eagerly: the per-group sums of all
    tensors of one device, dtype and ``first`` flag are concatenated, so that the per-group
    scalar algebra of :func:`_psi_coefficients` runs once for all of them (on CPU both in
    NumPy, :func:`_algebra_module`); then one in-place update per tensor
    (:func:`_psi_apply`).
    """
    batches: dict[tuple, tuple[list[tuple[torch.Tensor | None, ...]], list[int]]] = {}
    for x, grad, buffer, size, first in tasks:
        batch, sizes = batches.setdefault((x.device, x.dtype, first), ([], []))
        batch.append((x, grad, buffer))
        sizes.append(size)
    for (device, dtype, first), (batch, sizes) in batches.items():
        xp = _algebra_module(device)
        work = _working_copies(batch, dtype)
        views = _row_views(work, sizes, xp)
        compiled = _numba_step(xp) if kernel else None
        if compiled is not None:
            compiled.psi_sgd_rows(views, first=first, **hyper)
            _write_back(batch, work, written_around_autograd=True)
            continue
        sums = _stacked_sums(views, not first and views[0][2] is not None, xp)
        coefficients = _as_tensor(_psi_coefficients(sums, xp=xp, first=first, **hyper))
        start = 0
        for x, grad, buffer in _row_views(work, sizes, torch):
            end = start + x.shape[0]
            _psi_apply(x, grad, buffer, coefficients[start:end], first=first, **hyper)
            start = end
        _write_back(batch, work)
