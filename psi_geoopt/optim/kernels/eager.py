"""The fused PSI step as eager NumPy and PyTorch operations: per-group sums, in-place update."""

from __future__ import annotations

from types import ModuleType

import numpy
import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


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
    **_,
) -> None:
    """The in-place update of one tensor from its rows of :func:`_psi_coefficients`
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
