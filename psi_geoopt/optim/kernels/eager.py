r"""The fused PSI step as eager operations: NumPy for the per-group algebra of CPU tensors,
PyTorch elsewhere and for the in-place updates.

For every tensor of a batch, given as ``(groups, group_size)`` rows: the per-group sums
(:func:`_stacked_sums`, all tensors of the batch stacked, so that the per-group algebra of
:func:`psi_coefficients` runs once for all of them), then one in-place update per tensor
(:func:`_psi_apply`). NumPy's per-operation overhead is a fraction of PyTorch's, and the
algebra is a few dozen operations on vectors of one entry per group; on other devices NumPy
would need a copy to the host and a synchronization. The arithmetic is that of
:mod:`.._closed_form`, bound to NumPy or to PyTorch.
"""

from __future__ import annotations

from types import ModuleType

import numpy
import torch

from .._closed_form import (
    adam_hyper_parameters,
    adam_step_size,
    gradient_norm,
    specialize,
    step_coefficients,
)

__all__ = ["compute_dtype", "psi_adam_rows", "psi_coefficients", "psi_sgd_rows"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

_TORCH_FORMS = (gradient_norm, step_coefficients, adam_step_size)
_NUMPY_FORMS = tuple(specialize(function, numpy) for function in _TORCH_FORMS)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the step is computed in: float32 for float16/bfloat16 tensors."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def psi_sgd_rows(
    entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    *,
    xp: ModuleType,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first: bool,
) -> None:
    """The PSI SGD step, in place, of ``(x, grad, buffer)`` rows (``(groups, group_size)``
    tensors of one device and compute dtype; ``buffer`` ``None`` without momentum, its content
    ignored at the ``first`` step), the per-group algebra in ``xp`` (NumPy on CPU)."""
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov)
    views = _as_arrays(entries) if xp is numpy else entries
    sums = _stacked_sums(views, not first and entries[0][2] is not None, xp)
    coefficients = _as_tensor(psi_coefficients(sums, xp=xp, first=first, **hyper))
    start = 0
    for x, grad, buffer in entries:
        end = start + x.shape[0]
        _psi_apply(x, grad, buffer, coefficients[start:end], first=first, nesterov=nesterov)
        start = end


def psi_adam_rows(
    entries: list[tuple[torch.Tensor, ...]],
    *,
    xp: ModuleType,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    step: int,
) -> None:
    r"""The PSI Adam step, in place, of ``(x, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq])``
    rows (the last with AMSGrad) at step ``step``: the second moments of
    :func:`~.._closed_form.adam_step_size`, then the SGD step with momentum and dampening
    :math:`\beta_1` and one learning rate per group."""
    norm_of, _, step_size_of = _NUMPY_FORMS if xp is numpy else _TORCH_FORMS
    views = _as_arrays(entries) if xp is numpy else entries
    amsgrad = len(entries[0]) == 5
    sums = _stacked_sums(views, True, xp)
    second = xp.concatenate([v[3][:, 0] for v in views])
    peak = xp.concatenate([v[4][:, 0] for v in views]) if amsgrad else second
    lr, beta1, _, *adam = adam_hyper_parameters(lr, betas, eps, step)
    norm = norm_of(sums[:, 0], sums[:, 1], sums[:, 2])
    second, moment, step_sizes = step_size_of(second, peak, norm, lr, *adam, amsgrad)
    coefficients = psi_coefficients(
        sums, xp=xp, lr=step_sizes, momentum=beta1, dampening=beta1, nesterov=False, first=False
    )
    coefficients = _as_tensor(coefficients)
    per_group = [_as_tensor(second), _as_tensor(moment)] if amsgrad else [_as_tensor(second)]
    start = 0
    for x, grad, exp_avg, *moment_tensors in entries:
        end = start + x.shape[0]
        _psi_apply(x, grad, exp_avg, coefficients[start:end], nesterov=False, first=False)
        for target, value in zip(moment_tensors, per_group, strict=True):
            target.copy_(value[start:end, None].expand_as(target))
        start = end


def psi_coefficients(
    sums,
    *,
    xp: ModuleType = torch,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first: bool,
):
    r"""Per-group coefficients of one PSI step (:func:`~.._closed_form.step_coefficients`),
    from the per-group sums of :func:`_psi_sums`, as the columns of a ``(rows, k)`` matrix in
    the form :func:`_psi_apply` applies it:

    * without momentum: :math:`c_x - 1, c_u`;
    * with momentum: :math:`e_x, e_u, \gamma - 1, -\eta\gamma` and, after the first step,
      :math:`e_b` (here :math:`x_+ = x + (\gamma - 1) x - \eta\gamma\, b_+`);
    * with Nesterov: :math:`e_x, e_u, c_x - 1, c_u` and, after the first step, :math:`e_b, c_b`.

    ``sums`` is a tensor with ``xp=torch`` or a NumPy array with ``xp=numpy``; ``lr`` may be
    a vector, one learning rate per group (Adam's adaptive step).
    """
    norm_of, coefficients_of, _ = _NUMPY_FORMS if xp is numpy else _TORCH_FORMS
    xx, xu, uu = sums[:, 0], sums[:, 1], sums[:, 2]
    gg = xx * norm_of(xx, xu, uu)
    with_buffer = momentum != 0 and not first
    bu, bb = (sums[:, 3], sums[:, 4]) if with_buffer else (0.0, 0.0)
    bx_coeff, bu_coeff, bb_coeff, x_shift, u_coeff, b_coeff, growth = coefficients_of(
        xx, xu, gg, bu, bb, lr, momentum, 1 - dampening, not with_buffer, nesterov
    )
    if momentum == 0:  # d = g, as at a first step
        return xp.stack([x_shift, u_coeff], axis=1)
    columns = [bx_coeff, bu_coeff]
    columns += [x_shift, u_coeff] if nesterov else [growth, -lr * (1 + growth)]
    if not first:
        columns += [bb_coeff, b_coeff] if nesterov else [bb_coeff]
    return xp.stack(columns, axis=1)


def _as_arrays(entries: list[tuple[torch.Tensor | None, ...]]) -> list[tuple]:
    """NumPy arrays sharing the memory of the CPU tensors of ``entries``."""
    return [tuple(None if t is None else t.numpy() for t in tensors) for tensors in entries]


def _as_tensor(array) -> torch.Tensor:
    return torch.from_numpy(array) if isinstance(array, numpy.ndarray) else array


def _psi_sums(x: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    r"""Per-row sums :math:`s_{xx}, s_{xu}, s_{uu}` (and :math:`s_{bu}, s_{bb}` given a
    buffer) as the columns of a ``(rows, 3)`` or ``(rows, 5)`` matrix."""
    columns = [_sum_of_squares(x), torch.linalg.vecdot(x, grad, dim=1), _sum_of_squares(grad)]
    if buffer is not None:
        columns += [torch.linalg.vecdot(buffer, grad, dim=1), _sum_of_squares(buffer)]
    return torch.stack(columns, dim=1)


def _sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=1).square()


def _stacked_sums(views: list[tuple], with_buffer: bool, xp: ModuleType):
    """:func:`_psi_sums` of every ``(x, grad, buffer, ...)`` of ``views`` (tensors, or NumPy
    arrays with ``xp`` NumPy), stacked. In NumPy each sum is one call of
    :func:`numpy.vecdot` into its column, half the per-call cost of PyTorch's (float32 sums
    accumulate in float32, as on GPUs; the norm kept over 3000 steps is tested)."""
    if xp is torch:
        return torch.cat(
            [_psi_sums(x, grad, b if with_buffer else None) for x, grad, b, *_ in views]
        )
    sums = numpy.empty(
        (sum(v[0].shape[0] for v in views), 5 if with_buffer else 3), views[0][0].dtype
    )
    start = 0
    for x, grad, buffer, *_ in views:
        end = start + x.shape[0]
        out = sums[start:end]
        numpy.vecdot(x, x, out=out[:, 0])
        numpy.vecdot(x, grad, out=out[:, 1])
        numpy.vecdot(grad, grad, out=out[:, 2])
        if with_buffer:
            numpy.vecdot(buffer, grad, out=out[:, 3])
            numpy.vecdot(buffer, buffer, out=out[:, 4])
        start = end
    return sums


def _psi_apply(
    x: torch.Tensor,
    grad: torch.Tensor,
    buffer: torch.Tensor | None,
    coefficients: torch.Tensor,
    *,
    nesterov: bool,
    first: bool,
) -> None:
    """The in-place update of one tensor from its rows of :func:`psi_coefficients`
    (``buffer`` zeros at the ``first`` step)."""
    columns = coefficients.T.unsqueeze(-1).unbind()
    if buffer is None:
        x_shift, u_coeff = columns
        x.add_(x.mul(x_shift).addcmul_(grad, u_coeff))
    elif nesterov:
        bx_coeff, bu_coeff, x_shift, u_coeff, *with_buffer = columns
        increment = x.mul(x_shift).addcmul_(grad, u_coeff)
        if not first:
            bb_coeff, b_coeff = with_buffer
            increment.addcmul_(buffer, b_coeff)
            buffer.mul_(bb_coeff)
        buffer.addcmul_(grad, bu_coeff).addcmul_(x, bx_coeff)
        x.add_(increment)
    else:  # the buffer first, then x from it
        bx_coeff, bu_coeff, growth, b_after, *with_buffer = columns
        if not first:
            buffer.mul_(with_buffer[0])
        buffer.addcmul_(grad, bu_coeff).addcmul_(x, bx_coeff)
        x.addcmul_(x, growth).addcmul_(buffer, b_after)
