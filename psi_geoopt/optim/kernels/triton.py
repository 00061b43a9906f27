r"""The PSI SGD and Adam steps of a whole parameter group as one multi-tensor Triton kernel.

On a GPU the step of :class:`~psi_geoopt.optim.RiemannianSGD` is bound by memory traffic and
by kernel launches: PyTorch's eager operations launch a dozen kernels per tensor, and
:func:`torch.compile` still one or two per tensor. :func:`psi_sgd_step` launches **one**
kernel for all PSI tensors of a group, one program per group (row of a ``(groups,
group_size)`` view), which

1. reads its row of :math:`x`, :math:`u = \nabla f(x)` and the momentum buffer :math:`b`
   once and accumulates the five sums :math:`s_{xx}, s_{xu}, s_{uu}, s_{bu}, s_{bb}`;
2. forms the per-group coefficients of :func:`psi_geoopt.optim._psi_coefficients` (the
   same closed forms, here on scalars in registers);
3. reads the row again (now from cache: a row is at most :data:`MAX_ROW` elements) and
   writes :math:`x_+ = x + (c_x - 1) x + c_u u + c_b b` and
   :math:`b_+ = e_x x + e_u u + e_b b`.

Memory traffic per element is one read of :math:`x, u, b` and one write of :math:`x, b`:
five tensor passes, fewer than the eight of the three ``foreach`` operations of
:class:`torch.optim.SGD`'s momentum step. :func:`psi_adam_step` is the same kernel with the
group's learning rate formed from its second moment (:func:`psi_geoopt.optim._psi_adam`),
which it also writes. The tensors are reached through tables (``tensors``: addresses of
point, gradient, buffer and moments, row length; ``rows``: tensor index and element offset
of every row; the hyper-parameters in the compute dtype), uploaded only when one of them
changes. float16/bfloat16 tensors are computed in float32, float64 in float64.

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

from .._closed_form import _adam_hyper_parameters, _sgd_hyper_parameters

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


@triton.jit
def _radial_factors(xx, step):
    """The radial factors of :func:`psi_geoopt.optim._step_coefficients`:
    :math:`\\sqrt{s_{xx}}/\\|y\\|` and its difference to 1, and
    :math:`\\|y\\|/\\sqrt{s_{xx}} - 1`, without cancellation."""
    radius = tl.sqrt(xx)
    new_radius = tl.sqrt(xx + step)
    total = radius + new_radius
    return radius / new_radius, -step / (new_radius * total), step / (radius * total)


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
    row = tl.program_id(0)
    tensor = tl.load(rows + 2 * row)
    offset = tl.load(rows + 2 * row + 1)
    entry = tensors + _COLUMNS * tensor
    x_ptr = tl.load(entry).to(tl.pointer_type(STORAGE)) + offset
    u_ptr = tl.load(entry + 1).to(tl.pointer_type(STORAGE)) + offset
    b_ptr = tl.load(entry + 2).to(tl.pointer_type(STORAGE)) + offset
    size = tl.load(entry + 5)
    lanes = tl.arange(0, BLOCK)
    sum_xx = tl.zeros([BLOCK], COMPUTE)
    sum_xu = tl.zeros([BLOCK], COMPUTE)
    sum_uu = tl.zeros([BLOCK], COMPUTE)
    sum_bu = tl.zeros([BLOCK], COMPUTE)
    sum_bb = tl.zeros([BLOCK], COMPUTE)
    for start in range(0, size, BLOCK):
        index = start + lanes
        mask = index < size
        x = tl.load(x_ptr + index, mask=mask, other=0).to(COMPUTE)
        u = tl.load(u_ptr + index, mask=mask, other=0).to(COMPUTE)
        sum_xx += x * x
        sum_xu += x * u
        sum_uu += u * u
        if MOMENTUM and not FIRST:
            b = tl.load(b_ptr + index, mask=mask, other=0).to(COMPUTE)
            sum_bu += b * u
            sum_bb += b * b
    xx = tl.sum(sum_xx, 0)
    xu = tl.sum(sum_xu, 0)
    uu = tl.sum(sum_uu, 0)
    gradient_norm = tl.maximum(xx * uu - xu * xu, 0.0)  # |g|_g^2, and |g|^2 = s_xx |g|_g^2
    gg = xx * gradient_norm
    lr = tl.load(hyper)
    if ADAM:  # the group's learning rate from its second moment, with b the first moment
        v_ptr = tl.load(entry + 3).to(tl.pointer_type(STORAGE)) + offset
        beta2 = tl.load(hyper + 3)
        second = beta2 * tl.load(v_ptr).to(COMPUTE) + tl.load(hyper + 4) * gradient_norm
        moment = second
        if AMSGRAD:
            peak_ptr = tl.load(entry + 4).to(tl.pointer_type(STORAGE)) + offset
            moment = tl.maximum(tl.load(peak_ptr).to(COMPUTE), second)
        denominator = tl.sqrt(moment / tl.load(hyper + 7)) + tl.load(hyper + 5)
        lr = lr / (tl.load(hyper + 6) * denominator)
    if MOMENTUM:
        momentum = tl.load(hyper + 1)
        if FIRST:  # b' = g
            keep_b = 0.0
            keep_g = 1.0
            bb_new = gg
            bg_new = gg
        else:  # b' = mu b + (1 - tau) g, with <b, g> = s_xx s_bu
            keep_b = momentum
            keep_g = tl.load(hyper + 2)
            bg = xx * tl.sum(sum_bu, 0)
            bb_new = momentum * momentum * tl.sum(sum_bb, 0) + 2.0 * momentum * keep_g * bg
            bb_new += keep_g * keep_g * gg
            bg_new = momentum * bg + keep_g * gg
        if NESTEROV:  # d = g + mu b'
            direction_b = momentum * keep_b
            direction_g = 1.0 + momentum * keep_g
            dd = gg + 2.0 * momentum * bg_new + momentum * momentum * bb_new
            bd = bg_new + momentum * bb_new
        else:  # d = b'
            direction_b = keep_b
            direction_g = keep_g
            dd = bb_new
            bd = bb_new
        step = lr * lr * dd
        scale, shrink, growth = _radial_factors(xx, step)
        kappa = lr * bd / (xx + step)
        # b_+ = b' + kappa (x - lr d) = bx x + bu u + bb b
        along_g = keep_g - lr * kappa * direction_g
        bx_coeff = kappa - along_g * xu
        bu_coeff = along_g * xx
        bb_coeff = keep_b - lr * kappa * direction_b
        if NESTEROV:  # x_+ = (sqrt(s_xx) / |y|)(x - lr d)
            along = -lr * scale * direction_g
            x_shift = shrink - along * xu
            u_coeff = along * xx
            b_coeff = -lr * scale * direction_b
        else:  # x_+ = x + growth x + after b_+, from the new buffer
            after_coeff = -lr * (1.0 + growth)
    else:  # d = g
        scale, shrink, _ = _radial_factors(xx, lr * lr * gg)
        along = -lr * scale
        x_shift = shrink - along * xu
        u_coeff = along * xx
    for start in range(0, size, BLOCK):
        index = start + lanes
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
    The same update as :func:`psi_geoopt.optim._psi_apply` with
    :func:`psi_geoopt.optim._psi_coefficients`."""
    _launch(
        [(x, grad, buffer, None, None, size) for x, grad, buffer, size in entries],
        _sgd_hyper_parameters(lr, momentum, dampening),
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
    the update of :func:`psi_geoopt.optim._psi_adam`, the SGD step with momentum and
    dampening :math:`\beta_1` and the group's learning rate
    :math:`\eta / ((1 - \beta_1^t)(\sqrt{\hat v_t / (1 - \beta_2^t)} + \epsilon))`."""
    _launch(
        entries,
        _adam_hyper_parameters(lr, betas, eps, step),
        MOMENTUM=True,
        FIRST=False,
        NESTEROV=False,
        ADAM=True,
        AMSGRAD=entries[0][4] is not None,
    )


def _launch(entries: list[tuple], values: tuple[float, ...], **flags: bool) -> None:
    r"""One launch of :func:`_psi_kernel` over the rows of every entry ``(x, grad, buffer,
    second moment, its maximum, group_size)`` (absent tensors ``None``), with the
    hyper-parameters ``values`` of :func:`psi_geoopt.optim._sgd_hyper_parameters` or
    :func:`psi_geoopt.optim._adam_hyper_parameters`."""
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
