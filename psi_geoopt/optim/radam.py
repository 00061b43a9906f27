"""Riemannian Adam: the optimizer and its fast path."""

from __future__ import annotations

import inspect

import geoopt
import torch

from ._closed_form import _positive_part, _psi_coefficients
from ._fused import (
    _algebra_module,
    _as_tensor,
    _fused_group_size,
    _is_dtensor,
    _manifold_of,
    _numba_step,
    _row_views,
    _takes_kernel,
    _triton_step,
    _working_copies,
    _write_back,
)
from .kernels.eager import _psi_apply, _stacked_sums

__all__ = ["RiemannianAdam"]


class RiemannianAdam(geoopt.optim.RiemannianAdam):
    r"""geoopt's Riemannian Adam whose checkpoints resume bit-exactly.

    Same constructor, hyper-parameters, step and state format as
    :class:`geoopt.optim.RiemannianAdam` (``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``amsgrad``, ``stabilize``). On a :class:`~psi_geoopt.PSIManifold` parameter the second
    moment is accumulated from :meth:`~psi_geoopt.PSIManifold.component_inner`, one value per
    group:

    .. math::

        \begin{aligned}
            g_t &= \operatorname{egrad2rgrad}_{x_t}(\nabla f(x_t) + \lambda x_t), \qquad
            m_t = \beta_1 \mathcal{T}(m_{t-1}) + (1 - \beta_1) g_t, \\
            v_t &= \beta_2 v_{t-1} + (1 - \beta_2) \|g_t\|_g^2, \qquad
            x_{t+1} = \operatorname{retr}_{x_t}\Big(-\eta\,
            \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}\Big),
        \end{aligned}

    with :math:`\|g_t\|_g^2` broadcast over the group. :math:`v_t` is invariant under a
    rescaling of the group and :math:`m_t` scales with it, so the step of a group is an angle
    that does not depend on the group's scale (:math:`\epsilon` included), and equivalent
    starting points follow equivalent trajectories.

    Two changes. ``load_state_dict`` keeps ``state["step"]`` an ``int``
    (:meth:`torch.optim.Adam.__setstate__` would make it a float32 tensor). And a fast path,
    for contiguous :class:`~psi_geoopt.PSIManifold` parameters grouped along axis 0 and for
    Euclidean parameters (the group option ``foreach``, as in :class:`torch.optim.Adam`:
    ``None`` or ``True`` takes it, ``False`` runs geoopt's per-parameter loop for every
    parameter). PSI parameters: the same closed forms as :class:`RiemannianSGD`'s with
    momentum :math:`\beta_1`, dampening :math:`\beta_1` and one learning rate per group,
    :math:`\eta / ((1 - \beta_1^t)(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon))`, from five
    per-group sums, the per-group algebra batched across tensors (on CUDA one launch of the
    Triton kernel of :mod:`psi_geoopt.triton_step`, on CPU with Numba installed one call per
    tensor of the compiled loop of :mod:`psi_geoopt.numba_step`). Euclidean parameters: geoopt's
    operations as ``torch._foreach_*`` operations. The state keeps geoopt's format
    (``exp_avg_sq`` holds :math:`v_t` broadcast over each group). Other parameters go
    through geoopt's loop, which also adds the weight decay into their ``p.grad``; the fast
    path leaves ``p.grad`` untouched.
    """

    def __setstate__(self, state):
        super().__setstate__(state)
        for param_state in self.state.values():
            step = param_state.get("step")
            if torch.is_tensor(step):
                param_state["step"] = int(step.item())

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            fused = [self._fused_parameters(group) for group in self.param_groups]
            groups = self.param_groups
            self.param_groups = [
                {**group, "params": [p for p in group["params"] if id(p) not in taken]}
                for group, taken in zip(groups, ({id(p) for p, _ in f} for f in fused), strict=True)
            ]
            try:  # geoopt's loop for the other parameters, without the step hooks (run once)
                inspect.unwrap(geoopt.optim.RiemannianAdam.step)(self)
            finally:
                self.param_groups = groups
            for group, entries in zip(groups, fused, strict=True):
                if entries:
                    self._fused_step(group, entries)
        return loss

    def _fused_parameters(self, group: dict) -> list[tuple[torch.Tensor, int | None]]:
        """``(parameter, group_size)`` of the parameters of ``group`` that take the fast path:
        PSI parameters grouped along axis 0, and Euclidean ones (``group_size`` ``None``)."""
        if group["foreach"] is False:
            return []
        entries = []
        for point in group["params"]:
            if point.grad is None or point.grad.is_sparse or _is_dtensor(point):
                continue
            manifold = _manifold_of(point, self._default_manifold)
            euclidean = type(manifold) is geoopt.Euclidean and manifold.ndim == 0
            group_size = None if euclidean else _fused_group_size(point, manifold)
            state = self.state[point]
            moments = [state[key] for key in _ADAM_MOMENTS if key in state]
            if (euclidean or group_size is not None) and all(m.is_contiguous() for m in moments):
                entries.append((point, group_size))
        return entries

    def _fused_step(self, group: dict, entries: list[tuple[torch.Tensor, int | None]]) -> None:
        stabilize = group["stabilize"]
        due = False
        for point, _ in entries:
            state = self.state[point]
            if not state:
                state["step"] = 0
                for key in _ADAM_MOMENTS[: 3 if group["amsgrad"] else 2]:
                    state[key] = torch.zeros_like(point)
            state["step"] += 1
            due = due or (stabilize is not None and state["step"] % stabilize == 0)
        hyper = dict(
            lr=group["lr"], betas=group["betas"], eps=group["eps"], amsgrad=group["amsgrad"]
        )
        psi = [(point, size, self.state[point]) for point, size in entries if size is not None]
        if psi:
            _psi_adam(psi, **hyper)
        euclidean = [point for point, size in entries if size is None]
        if euclidean:
            _foreach_euclidean_adam(
                euclidean, self.state, weight_decay=group["weight_decay"], **hyper
            )
        if due:
            self.stabilize_group({"params": [point for point, _ in entries]})


def _foreach_euclidean_adam(
    params: list[torch.Tensor],
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
) -> None:
    r"""geoopt's Adam step on Euclidean parameters (``state["step"]`` already counted) with
    ``torch._foreach_*`` operations, one batch per step count, leaving ``p.grad`` untouched.
    The same operations as geoopt's loop:
    :math:`\hat m / (\sqrt{v / (1 - \beta_2^t)} + \epsilon)`,
    :math:`\hat m = m / (1 - \beta_1^t)`."""
    beta1, beta2 = betas
    batches: dict[int, list[torch.Tensor]] = {}
    for point in params:
        batches.setdefault(state[point]["step"], []).append(point)
    for step, points in batches.items():
        states = [state[p] for p in points]
        grads = [p.grad for p in points]
        if weight_decay != 0:
            grads = torch._foreach_add(grads, points, alpha=weight_decay)
        exp_avgs = [s["exp_avg"] for s in states]
        second = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(second, beta2)
        torch._foreach_add_(second, torch._foreach_mul(grads, grads), alpha=1 - beta2)
        if amsgrad:
            peaks = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(peaks, second)
            second = peaks
        denominator = torch._foreach_div(second, 1 - beta2**step)
        torch._foreach_sqrt_(denominator)
        torch._foreach_add_(denominator, eps)
        direction = torch._foreach_div(exp_avgs, 1 - beta1**step)
        torch._foreach_div_(direction, denominator)
        torch._foreach_add_(points, direction, alpha=-lr)


_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _psi_adam(
    entries: list[tuple[torch.Tensor, int, dict]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    amsgrad: bool,
) -> None:
    r"""The Adam step of ``(parameter, group_size, state)`` entries, ``state["step"]``
    already counted.

    Per group, :math:`v_t = \beta_2 v_{t-1} + (1 - \beta_2)(s_{xx} s_{uu} - s_{xu}^2)`
    (that is :math:`\|g\|_g^2`), and the update is :func:`_psi_coefficients`' with
    momentum and dampening :math:`\beta_1` and the learning rate of the group
    :math:`\eta / ((1 - \beta_1^t)(\sqrt{\hat v_t / (1 - \beta_2^t)} + \epsilon))`,
    :math:`\hat v_t` the running maximum of :math:`v_t` with ``amsgrad``, else :math:`v_t`.
    Tensors are batched by device, compute dtype and step count; on CUDA each batch is one
    launch of the Triton kernel (:func:`psi_geoopt.triton_step.psi_adam_step`), on CPU with
    Numba installed each tensor one call of :func:`psi_geoopt.numba_step.psi_adam_rows`.
    """
    beta1, beta2 = betas
    moments = _ADAM_MOMENTS[: 3 if amsgrad else 2]
    batches: dict[tuple, tuple[list[tuple[torch.Tensor, ...]], list[int]]] = {}
    kernel_batches: dict[tuple, list[tuple]] = {}
    for point, size, state in entries:
        if _takes_kernel(point, size):
            peak = state["max_exp_avg_sq"] if amsgrad else None
            key = (point.device, point.dtype, state["step"])
            kernel_batches.setdefault(key, []).append(
                (point, point.grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], peak, size)
            )
            continue
        batch, sizes = batches.setdefault((point.device, point.dtype, state["step"]), ([], []))
        batch.append((point.detach(), point.grad, *(state[key] for key in moments)))
        sizes.append(size)
    for (_, _, step), batch in kernel_batches.items():
        _triton_step().psi_adam_step(batch, lr=lr, betas=betas, eps=eps, step=step)
    for (device, dtype, step), (batch, sizes) in batches.items():
        xp = _algebra_module(device)
        work = _working_copies(batch, dtype)
        views = _row_views(work, sizes, xp)
        compiled = _numba_step(xp)
        if compiled is not None:
            compiled.psi_adam_rows(views, lr=lr, betas=betas, eps=eps, step=step)
            _write_back(batch, work, written_around_autograd=True)
            continue
        sums = _stacked_sums(views, True, xp)
        second = xp.concatenate([v[3][:, 0] for v in views])
        peak = xp.concatenate([v[4][:, 0] for v in views]) if amsgrad else None
        xx, xu, uu = sums[:, 0], sums[:, 1], sums[:, 2]
        second = beta2 * second + (1 - beta2) * _positive_part(xx * uu - xu * xu, xp)
        if peak is not None:
            peak = xp.maximum(peak, second)
        denominator = xp.sqrt((second if peak is None else peak) / (1 - beta2**step)) + eps
        step_sizes = lr / ((1 - beta1**step) * denominator)
        coefficients = _psi_coefficients(
            sums, xp=xp, lr=step_sizes, momentum=beta1, dampening=beta1, nesterov=False, first=False
        )
        coefficients = _as_tensor(coefficients)
        per_group = [_as_tensor(second)] if peak is None else [_as_tensor(second), _as_tensor(peak)]
        start = 0
        for x, grad, exp_avg, *moment_tensors in _row_views(work, sizes, torch):
            end = start + x.shape[0]
            _psi_apply(x, grad, exp_avg, coefficients[start:end], nesterov=False, first=False)
            for target, value in zip(moment_tensors, per_group, strict=True):
                target.copy_(value[start:end, None].expand_as(target))
            start = end
        _write_back(batch, work)
