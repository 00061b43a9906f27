r"""The PSI SGD and Adam steps of a whole parameter group as one multi-tensor Triton kernel.

On a GPU the step of :class:`~psi_geoopt.optim.RiemannianSGD` is bound by memory traffic and
by kernel launches: PyTorch's eager operations launch a dozen kernels per tensor, and
:func:`torch.compile` still one or two per tensor. :func:`psi_sgd_step` launches **one**
kernel for all PSI tensors of a group, one program per group (row of a ``(groups,
group_size)`` view), which

1. reads its row of :math:`x`, :math:`u = \nabla f(x)` and the momentum buffer :math:`b`
   once and accumulates the five sums :math:`s_{xx}, s_{xu}, s_{uu}, s_{bu}, s_{bb}`;
2. forms the per-group coefficients on scalars in registers: the closed forms of
   :mod:`psi_geoopt.optim._closed_form`, compiled by Triton with its ``sqrt`` and ``maximum``;
3. reads the row again (now from cache: a row is at most :data:`MAX_ROW` elements) and
   writes :math:`x_+ = x + (c_x - 1) x + c_u u + c_b b` and
   :math:`b_+ = e_x x + e_u u + e_b b`.

Memory traffic per element is one read of :math:`x, u, b` and one write of :math:`x, b`:
five tensor passes, fewer than the eight of the three ``foreach`` operations of
:class:`torch.optim.SGD`'s momentum step. :func:`psi_adam_step` is the same kernel with the
group's learning rate formed from its second moment
(:func:`~psi_geoopt.optim._closed_form.adam_step_size`), which it also writes. The tensors are
reached through tables (``tensors``: addresses of point, gradient, buffer and moments, row
length; ``rows``: tensor index and element offset of every row; the hyper-parameters in the
compute dtype), uploaded only when one of them changes. float16/bfloat16 tensors are computed
in float32, float64 in float64.

The kernel runs on CUDA devices; the tests run it on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``). It needs PyTorch >= 2.5, whose
:func:`torch.autograd.graph.increment_version` takes a list: the tensors it writes are marked
as modified in place, so that autograd still detects a backward through an outdated graph.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy
import torch
import triton
import triton.language as tl
from torch.autograd.graph import increment_version

from .._closed_form import (
    adam_hyper_parameters,
    adam_step_size,
    gradient_norm,
    sgd_hyper_parameters,
    specialize,
    step_coefficients,
)

__all__ = ["MAX_ROW", "psi_adam_step", "psi_sgd_step"]

MAX_ROW = 2**16
"""Longest group (elements) the kernel takes: one program reads a group twice, and a longer
one would leave the GPU with too few programs and the second read outside the cache."""

_COLUMNS: tl.constexpr = tl.constexpr(6)  # of the tensor table, see _tensor_table

_STORAGE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


_gradient_norm, _step_coefficients, _adam_step_size = (
    triton.jit(specialize(function, tl))
    for function in (gradient_norm, step_coefficients, adam_step_size)
)


@triton.jit
def _row_sums(
    x_ptr, u_ptr, b_ptr, size, COMPUTE: tl.constexpr, BUFFER: tl.constexpr, BLOCK: tl.constexpr
):
    """The first read pass over a row: :math:`s_{xx}, s_{xu}, s_{uu}` and, with ``BUFFER``,
    :math:`s_{bu}, s_{bb}` (else zeros), accumulated in the compute dtype."""
    sum_xx = tl.zeros([BLOCK], COMPUTE)
    sum_xu = tl.zeros([BLOCK], COMPUTE)
    sum_uu = tl.zeros([BLOCK], COMPUTE)
    sum_bu = tl.zeros([BLOCK], COMPUTE)
    sum_bb = tl.zeros([BLOCK], COMPUTE)
    for start in range(0, size, BLOCK):
        index = start + tl.arange(0, BLOCK)
        mask = index < size
        x = tl.load(x_ptr + index, mask=mask, other=0).to(COMPUTE)
        u = tl.load(u_ptr + index, mask=mask, other=0).to(COMPUTE)
        sum_xx += x * x
        sum_xu += x * u
        sum_uu += u * u
        if BUFFER:
            b = tl.load(b_ptr + index, mask=mask, other=0).to(COMPUTE)
            sum_bu += b * u
            sum_bb += b * b
    return (
        tl.sum(sum_xx, 0),
        tl.sum(sum_xu, 0),
        tl.sum(sum_uu, 0),
        tl.sum(sum_bu, 0),
        tl.sum(sum_bb, 0),
    )


@triton.jit
def _psi_kernel(
    rows,
    tensors,
    hyper,
    STORAGE: tl.constexpr,
    COMPUTE: tl.constexpr,
    MOMENTUM: tl.constexpr,
    FIRST: tl.constexpr,
    NESTEROV: tl.constexpr,
    ADAM: tl.constexpr,
    AMSGRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The step of one group (program): its sums, its coefficients, its update."""
    row = tl.program_id(0)
    tensor = tl.load(rows + 2 * row)
    offset = tl.load(rows + 2 * row + 1)
    entry = tensors + _COLUMNS * tensor
    x_ptr = tl.load(entry).to(tl.pointer_type(STORAGE)) + offset
    u_ptr = tl.load(entry + 1).to(tl.pointer_type(STORAGE)) + offset
    b_ptr = tl.load(entry + 2).to(tl.pointer_type(STORAGE)) + offset
    size = tl.load(entry + 5)
    xx, xu, uu, bu, bb = _row_sums(
        x_ptr, u_ptr, b_ptr, size, COMPUTE, MOMENTUM and not FIRST, BLOCK
    )
    norm = _gradient_norm(xx, xu, uu)  # |g|_g^2, and |g|^2 = s_xx |g|_g^2
    lr = tl.load(hyper)
    if ADAM:  # the group's learning rate from its second moment, with b the first moment
        v_ptr = tl.load(entry + 3).to(tl.pointer_type(STORAGE)) + offset
        second = tl.load(v_ptr).to(COMPUTE)
        peak = second
        if AMSGRAD:
            peak_ptr = tl.load(entry + 4).to(tl.pointer_type(STORAGE)) + offset
            peak = tl.load(peak_ptr).to(COMPUTE)
        second, moment, lr = _adam_step_size(
            second,
            peak,
            norm,
            lr,
            tl.load(hyper + 3),
            tl.load(hyper + 4),
            tl.load(hyper + 5),
            tl.load(hyper + 6),
            tl.load(hyper + 7),
            AMSGRAD,
        )
    bx_coeff, bu_coeff, bb_coeff, x_shift, u_coeff, b_coeff, growth = _step_coefficients(
        xx,
        xu,
        xx * norm,
        bu,
        bb,
        lr,
        tl.load(hyper + 1),
        tl.load(hyper + 2),
        not (MOMENTUM and not FIRST),
        NESTEROV,
    )
    after_coeff = -lr * (1.0 + growth)  # without Nesterov x_+ = x + growth x + after b_+
    for start in range(0, size, BLOCK):
        index = start + tl.arange(0, BLOCK)
        mask = index < size
        x = tl.load(x_ptr + index, mask=mask, other=0).to(COMPUTE)
        u = tl.load(u_ptr + index, mask=mask, other=0).to(COMPUTE)
        if MOMENTUM:
            buffer = bx_coeff * x + bu_coeff * u
            if not FIRST:
                b = tl.load(b_ptr + index, mask=mask, other=0).to(COMPUTE)
                buffer += bb_coeff * b
            tl.store(b_ptr + index, buffer.to(STORAGE), mask=mask)
            if NESTEROV:
                increment = x_shift * x + u_coeff * u
                if not FIRST:
                    increment += b_coeff * b
            else:
                increment = growth * x + after_coeff * buffer
        else:
            increment = x_shift * x + u_coeff * u
        tl.store(x_ptr + index, (x + increment).to(STORAGE), mask=mask)
        if ADAM:  # the moments, broadcast over the group as geoopt stores them
            tl.store(v_ptr + index, (tl.zeros([BLOCK], COMPUTE) + second).to(STORAGE), mask=mask)
            if AMSGRAD:
                tl.store(
                    peak_ptr + index, (tl.zeros([BLOCK], COMPUTE) + moment).to(STORAGE), mask=mask
                )


_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_TABLES_KEPT = 64


def _table(key: tuple, build: Callable[[], numpy.ndarray], device: torch.device) -> torch.Tensor:
    """The table ``build()`` on ``device``, cached under ``key`` (a table is a function of its
    key alone, so a hit is always right; the least recently used of :data:`_TABLES_KEPT`
    tables are dropped). Uploaded from pinned memory without waiting for the GPU."""
    table = _TABLES.get(key)
    if table is None:
        host = torch.from_numpy(build())
        if device.type == "cuda":
            table = host.pin_memory().to(device, non_blocking=True)
        else:
            table = host.to(device)
        _TABLES[key] = table
        if len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def psi_sgd_step(
    entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first: bool,
) -> None:
    """The PSI SGD step, in place, of ``(x, grad, buffer, group_size)`` entries: contiguous
    tensors of one device and dtype whose groups are the rows of ``(-1, group_size)`` views;
    ``buffer`` is ``None`` without momentum, its content ignored at the ``first`` step.
    The same update as :func:`.eager.psi_sgd_rows`."""
    _launch(
        [(x, grad, buffer, None, None, size) for x, grad, buffer, size in entries],
        sgd_hyper_parameters(lr, momentum, dampening),
        MOMENTUM=momentum != 0,
        FIRST=first,
        NESTEROV=nesterov,
        ADAM=False,
        AMSGRAD=False,
    )


def psi_adam_step(
    entries: list[tuple[torch.Tensor, ...]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    step: int,
) -> None:
    r"""The PSI Adam step, in place, of ``(x, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
    group_size)`` entries (``max_exp_avg_sq`` ``None`` without AMSGrad) at step ``step``:
    the update of :func:`.eager.psi_adam_rows`, the SGD step with momentum and dampening
    :math:`\beta_1` and the group's learning rate of
    :func:`~psi_geoopt.optim._closed_form.adam_step_size`."""
    _launch(
        entries,
        adam_hyper_parameters(lr, betas, eps, step),
        MOMENTUM=True,
        FIRST=False,
        NESTEROV=False,
        ADAM=True,
        AMSGRAD=entries[0][4] is not None,
    )


def _launch(entries: list[tuple], values: tuple[float, ...], **flags: bool) -> None:
    r"""One launch of :func:`_psi_kernel` over the rows of every entry ``(x, grad, buffer,
    second moment, its maximum, group_size)`` (absent tensors ``None``), with the
    hyper-parameters ``values`` of :func:`~psi_geoopt.optim._closed_form.sgd_hyper_parameters`
    or :func:`~psi_geoopt.optim._closed_form.adam_hyper_parameters`."""
    x0 = entries[0][0]
    device, dtype = x0.device, x0.dtype
    compute = numpy.float64 if dtype == torch.float64 else numpy.float32
    hyper = _table(
        ("hyper", device, compute, values),
        lambda: numpy.array(values, dtype=compute),
        device,
    )
    shapes, addresses, written = [], [], []
    for x, grad, *others, size in entries:
        shapes.append((x.numel() // size, size))
        addresses.append(
            (x.data_ptr(), grad.data_ptr(), *(0 if t is None else t.data_ptr() for t in others))
        )
        written.append(x)
        written.extend(t for t in others if t is not None)
    shapes, addresses = tuple(shapes), tuple(addresses)
    rows = _table(("rows", device, shapes), lambda: _row_table(shapes), device)
    tensors = _table(
        ("tensors", device, addresses, shapes),
        lambda: _tensor_table(addresses, shapes),
        device,
    )
    longest = max(size for _, size in shapes)
    # the kernel writes through raw addresses: tell autograd, as PyTorch's in-place ops do
    increment_version(written)
    _psi_kernel[(rows.shape[0],)](
        rows,
        tensors,
        hyper,
        STORAGE=_STORAGE[dtype],
        COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
        BLOCK=min(max(triton.next_power_of_2(longest), 128), 1024),
        **flags,
    )


def _row_table(shapes: tuple[tuple[int, int], ...]) -> numpy.ndarray:
    """``(rows, 2)`` int64: for every group of every tensor, the tensor's index and the
    group's first element."""
    index = numpy.concatenate(
        [numpy.full(groups, tensor, dtype=numpy.int64) for tensor, (groups, _) in enumerate(shapes)]
    )
    offset = numpy.concatenate(
        [numpy.arange(groups, dtype=numpy.int64) * size for groups, size in shapes]
    )
    return numpy.stack([index, offset], axis=1)


def _tensor_table(addresses: tuple, shapes: tuple[tuple[int, int], ...]) -> numpy.ndarray:
    """``(tensors, 6)`` int64: addresses of point, gradient, buffer, second moment and its
    maximum (0 where absent), and the group size."""
    return numpy.array(
        [(*pointers, size) for pointers, (_, size) in zip(addresses, shapes, strict=True)],
        dtype=numpy.int64,
    )
