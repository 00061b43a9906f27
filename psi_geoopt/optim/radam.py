r"""Riemannian Adam: the optimizer, its reference loop and its fast path.

:class:`RiemannianAdam` takes the steps of geoopt's :class:`geoopt.optim.RiemannianAdam` (same
constructor, hyper-parameters and state format) with two changes: its checkpoints resume
bit-exactly (:meth:`torch.optim.Adam.__setstate__`, which ``load_state_dict`` calls, turns
geoopt's integer ``state["step"]`` into a float32 tensor, and the bias corrections
:math:`1 - \beta^t` computed from it differ in the last bits from those of the uninterrupted
run; here the step stays an integer), and it has a fast path. As in :mod:`torch.optim.adam`,
two implementations with one signature: :func:`_single_tensor_radam`, geoopt's loop (the
manifold's operations, parameter by parameter), and :func:`_multi_tensor_radam`:
``foreach`` operations for Euclidean parameters and, for PSI parameters, the closed forms of
:mod:`._closed_form` (the fused step of :mod:`._fused`).
"""

from __future__ import annotations

import geoopt
import torch

from ._fused import _fused_group_size, _is_dtensor, _manifold_of, psi_adam
from ._mixin import FastPathMixin, StabilizeChecksPoints

__all__ = ["RiemannianAdam"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_UNSUPPORTED = ("maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay")
"""Options of :class:`torch.optim.Adam` that geoopt's constructor accepts and its step ignores."""


class RiemannianAdam(FastPathMixin, StabilizeChecksPoints, geoopt.optim.RiemannianAdam):
    r"""geoopt's Riemannian Adam, with checkpoints that resume bit-exactly and a fast path.

    For parameters :math:`x` on a manifold :math:`\mathcal{M}`, with
    :math:`\langle \cdot, \cdot \rangle_x` its ``component_inner``:

    .. math::
       \begin{aligned}
            &\rule{31em}{0.4pt}                                                                  \\
            &\textbf{input}      : \eta \text{ (lr)}, \beta_1, \beta_2
                \text{ (betas)}, x_0 \in \mathcal{M} \text{ (params)}, f(x) \text{ (objective)}  \\
            &\hspace{13mm}      \lambda \text{ (weight decay)},  \: \textit{amsgrad},
                \: \epsilon \text{ (epsilon)}                                                    \\
            &\textbf{initialize} :  m_0 \leftarrow 0 \text{ (first moment)},
                v_0\leftarrow 0 \text{ (second moment)},\: v_0^{max}\leftarrow 0          \\[-1.ex]
            &\rule{31em}{0.4pt}                                                                  \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \mathrm{egrad2rgrad}_{x_{t-1}}
                \big(\nabla f(x_{t-1}) + \lambda x_{t-1}\big)                                    \\
            &\hspace{5mm}m_t           \leftarrow   \beta_1 \tilde m_{t-1} + (1 - \beta_1) g_t   \\
            &\hspace{5mm}v_t \leftarrow \beta_2 v_{t-1}
                + (1-\beta_2) \langle g_t, g_t \rangle_{x_{t-1}}                                 \\
            &\hspace{5mm}\widehat{m_t} \leftarrow   m_t/\big(1-\beta_1^t \big)                   \\
            &\hspace{5mm}\textbf{if} \: amsgrad                                                  \\
            &\hspace{10mm} v_t^{max} \leftarrow \mathrm{max}(v_{t-1}^{max},v_t)                  \\
            &\hspace{10mm}\widehat{v_t} \leftarrow v_t^{max}/\big(1-\beta_2^t \big)              \\
            &\hspace{5mm}\textbf{else}                                                           \\
            &\hspace{10mm}\widehat{v_t} \leftarrow   v_t/\big(1-\beta_2^t \big)                  \\
            &\hspace{5mm}x_t, \tilde m_t \leftarrow \mathrm{retr\_transp}_{x_{t-1}}
                \Bigl(-\eta\, \widehat{m_t} / \big(\sqrt{\widehat{v_t}} + \epsilon\big),
                m_t\Bigr)                                                                        \\
            &\rule{31em}{0.4pt}                                                           \\[-1.ex]
            &\textbf{return} \: x_t                                                       \\[-1.ex]
            &\rule{31em}{0.4pt}                                                           \\[-1.ex]
       \end{aligned}

    On a :class:`~psi_geoopt.PSIManifold` parameter ``component_inner`` gives one value per
    group, :math:`\|g_t\|_g^2`, broadcast over the group: :math:`v_t` is invariant under a
    rescaling of the group and :math:`m_t` scales with it, so the step of a group is an angle
    that does not depend on the group's scale (:math:`\epsilon` included), and equivalent
    starting points follow equivalent trajectories.

    The state keeps geoopt's format: ``step`` (an ``int``, also after ``load_state_dict``,
    where :meth:`torch.optim.Adam.__setstate__` would make it a float32 tensor, so that a
    resumed run is bit-identical), ``exp_avg`` (:math:`\tilde m_t`), ``exp_avg_sq``
    (:math:`v_t`) and, with ``amsgrad``, ``max_exp_avg_sq``. ``p.grad`` is left untouched
    (geoopt's loop adds the weight decay into it). :class:`torch.optim.Adam`'s options that
    geoopt's step ignores (``maximize``, ``capturable``, ``differentiable``, ``fused``,
    ``decoupled_weight_decay``) are refused.

    Parameters
    ----------
    params : iterable
        parameters, or dicts defining parameter groups.
    lr, betas, eps, weight_decay, amsgrad, stabilize
        as for :class:`geoopt.optim.RiemannianAdam`.
    foreach : bool or None
        ``None`` (default) or ``True``: the fast path. For contiguous
        :class:`~psi_geoopt.PSIManifold` parameters grouped along axis 0, the closed forms of
        :class:`RiemannianSGD`'s fast path with momentum :math:`\beta_1`, dampening
        :math:`\beta_1` and one learning rate per group,
        :math:`\eta / ((1 - \beta_1^t)(\sqrt{\hat v_t / (1 - \beta_2^t)} + \epsilon))`, from
        five per-group sums, the per-group algebra batched across tensors; for Euclidean
        parameters, geoopt's operations as ``torch._foreach_*`` operations; every other
        parameter takes the reference loop. ``False``: the reference loop (geoopt's
        algorithm) for every parameter. Both compute the same step up to rounding.
    compile : bool or None
        ``None`` (default) or ``True``: the fused PSI step as compiled code where there is
        one — on CUDA one launch of the Triton kernel of
        :mod:`psi_geoopt.optim.kernels.triton` per parameter group, on CPU one call per
        tensor of the Numba loop of :mod:`psi_geoopt.optim.kernels.numba` — and eager
        operations elsewhere. ``False``: eager operations everywhere.

    ``foreach`` and ``compile`` are stored in every parameter group (a group may set its own)
    and, as every group option, saved by ``state_dict`` and restored by ``load_state_dict``.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        *,
        foreach: bool | None = None,
        compile: bool | None = None,
        stabilize=None,
        **options,
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            stabilize=stabilize,
            **options,
        )
        self._set_default_options(compile=compile)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in _UNSUPPORTED:
            if group.get(key):
                raise ValueError(
                    f"RiemannianAdam: {key}={group[key]!r} is not supported (geoopt's "
                    "Riemannian Adam has no such variant)"
                )

    def __setstate__(self, state):
        super().__setstate__(state)
        for param_state in self.state.values():
            step = param_state.get("step")
            if torch.is_tensor(step):
                param_state["step"] = int(step.item())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = self._params_with_grad(group)
            step = _single_tensor_radam if group["foreach"] is False else _multi_tensor_radam
            step(
                params,
                self.state,
                self._default_manifold,
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"],
                compile=group["compile"],
            )
            every = group["stabilize"]
            if every is not None and any(self.state[p]["step"] % every == 0 for p in params):
                self.stabilize_group(group)
        return loss


def _single_tensor_radam(
    params: list[torch.Tensor],
    state: dict,
    default_manifold: geoopt.Manifold,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    compile: bool | None = None,
) -> None:
    """The reference step, geoopt's loop: the manifold's operations, one parameter at a time,
    in the order of geoopt's operations (``compile`` is not used: the signature is
    :func:`_multi_tensor_radam`'s)."""
    beta1, beta2 = betas
    for point in params:
        manifold = _manifold_of(point, default_manifold)
        param_state = _adam_state(point, state, amsgrad)
        param_state["step"] += 1
        exp_avg, exp_avg_sq = param_state["exp_avg"], param_state["exp_avg_sq"]
        grad = point.grad
        if weight_decay != 0:
            grad = grad.add(point, alpha=weight_decay)
        grad = manifold.egrad2rgrad(point, grad)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).add_(manifold.component_inner(point, grad), alpha=1 - beta2)
        bias_correction1 = 1 - beta1 ** param_state["step"]
        bias_correction2 = 1 - beta2 ** param_state["step"]
        if amsgrad:
            max_exp_avg_sq = param_state["max_exp_avg_sq"]
            torch.max(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denominator = max_exp_avg_sq.div(bias_correction2).sqrt_()
        else:
            denominator = exp_avg_sq.div(bias_correction2).sqrt_()
        direction = exp_avg.div(bias_correction1) / denominator.add_(eps)
        new_point, new_exp_avg = manifold.retr_transp(point, -lr * direction, exp_avg)
        point.copy_(new_point)
        exp_avg.copy_(new_exp_avg)


def _multi_tensor_radam(
    params: list[torch.Tensor],
    state: dict,
    default_manifold: geoopt.Manifold,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    compile: bool | None = None,
) -> None:
    """The fast step: the same update as :func:`_single_tensor_radam`.

    Parameters on :class:`~psi_geoopt.PSIManifold` grouped along axis 0 take the fused step
    (:func:`._fused.psi_adam`, on the backend ``compile`` selects), Euclidean ones
    ``torch._foreach_*`` operations, every other parameter (other manifolds, sharded or
    non-contiguous tensors or moments) the reference loop.
    """
    fused, euclidean, other = [], [], []
    for point in params:
        param_state = _adam_state(point, state, amsgrad)
        moments = (param_state[key] for key in _MOMENTS if key in param_state)
        if _is_dtensor(point) or not all(m.is_contiguous() for m in moments):
            other.append(point)
            continue
        manifold = _manifold_of(point, default_manifold)
        if type(manifold) is geoopt.Euclidean and manifold.ndim == 0:
            euclidean.append(point)
        elif (group_size := _fused_group_size(point, manifold)) is not None:
            fused.append((point, group_size, param_state))
        else:
            other.append(point)
    for point in [entry[0] for entry in fused] + euclidean:
        state[point]["step"] += 1
    hyper = dict(lr=lr, betas=betas, eps=eps, amsgrad=amsgrad)
    if fused:
        psi_adam(fused, compile=compile, **hyper)
    if euclidean:
        _foreach_euclidean_adam(euclidean, state, weight_decay=weight_decay, **hyper)
    if other:
        _single_tensor_radam(
            other, state, default_manifold, weight_decay=weight_decay, compile=compile, **hyper
        )


def _adam_state(point: torch.Tensor, state: dict, amsgrad: bool) -> dict:
    """The state of ``point``, created as geoopt's loop creates it at its first step."""
    param_state = state[point]
    if not param_state:
        param_state["step"] = 0
        for key in _MOMENTS[: 3 if amsgrad else 2]:
            param_state[key] = torch.zeros_like(point)
    return param_state


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
