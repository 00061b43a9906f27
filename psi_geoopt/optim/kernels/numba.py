r"""The PSI SGD and Adam steps of one tensor as one compiled loop over its groups, on CPU.

On CPU the eager step of a small network is bound by per-operation overhead, not by memory
traffic: for the three convolutions of the demo ConvNet the eager path makes some seventy
calls (five NumPy sums per tensor, some forty NumPy operations of per-group algebra, a dozen
PyTorch in-place updates), each a microsecond or more, where the arithmetic itself takes a
few; on a large network each of those operations is a pass over memory. Compiled by
`Numba <https://numba.pydata.org>`_, the whole step of a tensor is one call: for every group
(row of its ``(groups, group_size)`` view) :func:`_psi_rows`

1. reads the row of :math:`x`, :math:`u = \nabla f(x)` and the buffer :math:`b` once,
   accumulating :math:`s_{xx}, s_{xu}, s_{uu}, s_{bu}, s_{bb}` in float64;
2. forms the per-group coefficients on float64 scalars: the closed forms of
   :mod:`psi_geoopt.optim._closed_form`, compiled with NumPy's ``sqrt`` and ``maximum``;
3. reads the row again and writes :math:`b_+` and :math:`x_+`, each rounded once to the
   storage dtype. The row is still in cache: per element, memory sees one read of
   :math:`x, u, b` and one write of :math:`x, b`.

It is the CPU twin of the Triton kernel of :mod:`.triton`, and used by
:class:`~psi_geoopt.optim.RiemannianSGD` and :class:`~psi_geoopt.optim.RiemannianAdam` on CPU
(Numba is a dependency; where it cannot be imported they run the same step eagerly).
Arrays are float32 or float64 (float16/bfloat16 tensors are computed on float32 copies),
C-contiguous; the compiled code is cached on disk after the first call. Division follows
NumPy's rules (``error_model="numpy"``): a zero group gives NaN, as on the other paths,
instead of raising.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable

import numba
import numpy
import torch

from .. import _closed_form
from .._closed_form import (
    adam_hyper_parameters,
    adam_step_size,
    gradient_norm,
    sgd_hyper_parameters,
    specialize,
    step_coefficients,
)

__all__ = ["psi_adam_rows", "psi_sgd_rows"]


_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
"""Compiled once and cached on disk; NumPy's division rules; sums reassociated (vectorized),
multiplications and additions contracted into fused multiply-adds."""


_gradient_norm, _step_coefficients, _adam_step_size = (
    numba.njit(**_OPTIONS)(specialize(function, numpy))
    for function in (gradient_norm, step_coefficients, adam_step_size)
)


_CLOSED_FORMS = hashlib.sha256(inspect.getsource(_closed_form).encode()).hexdigest()
"""A digest of :mod:`psi_geoopt.optim._closed_form`, a closure variable of :func:`_psi_rows`:
Numba keys the on-disk cache of a function to its own file and to its closure, and the loop
inlines the closed forms, so without it an edit of the closed forms would leave the loop
running the old ones from the cache."""


def _compile_rows(parallel: bool) -> Callable[..., None]:
    """:func:`_psi_rows` compiled serially or with its groups spread over threads (``rows``
    is then :func:`numba.prange`; a distinct closure, so that the two are cached apart)."""
    rows = numba.prange if parallel else range
    closed_forms = _CLOSED_FORMS

    @numba.njit(parallel=parallel, **_OPTIONS)
    def _psi_rows(
        x: numpy.ndarray,
        u: numpy.ndarray,
        b: numpy.ndarray,
        second: numpy.ndarray,
        peak: numpy.ndarray,
        hyper: numpy.ndarray,
        with_momentum: bool,
        first: bool,
        nesterov: bool,
        adam: bool,
        amsgrad: bool,
    ) -> None:
        r"""The step of every row of ``x`` in place; ``b`` the buffer (ignored without momentum,
        read as zeros at the ``first`` step), ``second`` and ``peak`` Adam's :math:`v` and its
        running maximum, broadcast over each row (ignored without ``adam``, ``peak`` without
        ``amsgrad``). ``hyper``: :math:`\eta, \mu, 1 - \tau` and for Adam
        :math:`\beta_2, 1 - \beta_2, \epsilon, 1 - \beta_1^t, 1 - \beta_2^t`
        (:func:`~psi_geoopt.optim._closed_form.adam_hyper_parameters`)."""
        closed_forms  # noqa: B018 (in the closure, hence in the cache key: see _CLOSED_FORMS)
        groups, size = x.shape
        lr, momentum, keep = hyper[0], hyper[1], hyper[2]
        with_buffer = with_momentum and not first
        for row in rows(groups):
            xx = xu = uu = bu = bb = 0.0
            for i in range(size):
                xi, ui = numpy.float64(x[row, i]), numpy.float64(u[row, i])
                xx += xi * xi
                xu += xi * ui
                uu += ui * ui
                if with_buffer:
                    bi = numpy.float64(b[row, i])
                    bu += bi * ui
                    bb += bi * bi
            norm = _gradient_norm(xx, xu, uu)  # |g|_g^2, and |g|^2 = s_xx |g|_g^2
            step_size = lr
            if adam:  # the group's learning rate from its second moment
                new_second, moment, step_size = _adam_step_size(
                    second[row, 0],
                    peak[row, 0],
                    norm,
                    lr,
                    hyper[3],
                    hyper[4],
                    hyper[5],
                    hyper[6],
                    hyper[7],
                    amsgrad,
                )
            bx_coeff, bu_coeff, bb_coeff, x_shift, u_coeff, b_coeff, growth = _step_coefficients(
                xx, xu, xx * norm, bu, bb, step_size, momentum, keep, not with_buffer, nesterov
            )
            if not with_momentum:  # d = g, as at a first step
                for i in range(size):
                    xi = numpy.float64(x[row, i])
                    x[row, i] = xi + (x_shift * xi + u_coeff * numpy.float64(u[row, i]))
                continue
            # with Nesterov x_+ = x + x_shift x + u_coeff u + b_coeff b,
            # else x_+ = x + growth x + after b_+
            after = -step_size * (1 + growth)
            for i in range(size):
                xi, ui = numpy.float64(x[row, i]), numpy.float64(u[row, i])
                bi = numpy.float64(b[row, i]) if with_buffer else 0.0
                buffer = bx_coeff * xi + bu_coeff * ui + bb_coeff * bi
                if nesterov:
                    increment = x_shift * xi + u_coeff * ui + b_coeff * bi
                else:
                    increment = growth * xi + after * buffer
                b[row, i] = buffer
                x[row, i] = xi + increment
            if adam:  # the moments, broadcast over the group as geoopt stores them
                second[row, :] = new_second
                if amsgrad:
                    peak[row, :] = moment

    return _psi_rows


_SERIAL, _PARALLEL = _compile_rows(False), _compile_rows(True)

PARALLEL_NUMEL = 2**15
"""Size (elements) from which a tensor's groups are spread over threads. On 2 cores, float32,
momentum: at 2^12 elements both take 7 µs, at 2^15 the threads take 18 µs against 31 µs;
below, waking threads costs about what they save, and more on a loaded machine."""


def _loop_for(size: int) -> Callable[..., None]:
    """The loop for an array of ``size`` elements: the threaded one from
    :data:`PARALLEL_NUMEL` elements on as many threads as PyTorch uses
    (:func:`torch.get_num_threads`, at most Numba's ``NUMBA_NUM_THREADS``), else the serial one.

    Numba's OpenMP threading layer shares the OpenMP runtime with PyTorch: a parallel region
    run with another thread count would change PyTorch's own (``torch.set_num_threads(1)``
    would read 2 after a step on 2 cores), so the count is set to PyTorch's first.
    """
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if size < PARALLEL_NUMEL or threads < 2:
        return _SERIAL
    numba.set_num_threads(threads)
    return _PARALLEL


def psi_sgd_rows(
    entries: list[tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray | None]],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first: bool,
) -> None:
    """The PSI SGD step, in place, of ``(x, grad, buffer)`` entries: the rows of ``x``
    (``(groups, group_size)``) with gradient ``grad`` and momentum ``buffer`` (``None``
    without momentum, its content ignored at the ``first`` step); one call per entry. The
    update of :func:`.eager.psi_sgd_rows`."""
    hyper = numpy.array(sgd_hyper_parameters(lr, momentum, dampening))
    flags = (momentum != 0, first, nesterov, False, False)
    for x, grad, buffer in entries:  # absent arrays are passed as x, never touched
        _loop_for(x.size)(x, grad, x if buffer is None else buffer, x, x, hyper, *flags)


def psi_adam_rows(
    entries: list[tuple[numpy.ndarray, ...]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    step: int,
) -> None:
    r"""The PSI Adam step, in place, of ``(x, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq])``
    entries (the last with AMSGrad) at step ``step``: the update of
    :func:`.eager.psi_adam_rows`, the SGD step with momentum and dampening :math:`\beta_1` and
    the group's learning rate of :func:`~psi_geoopt.optim._closed_form.adam_step_size`."""
    hyper = numpy.array(adam_hyper_parameters(lr, betas, eps, step))
    for x, grad, exp_avg, second, *peak in entries:
        maximum = peak[0] if peak else second
        _loop_for(x.size)(
            x, grad, exp_avg, second, maximum, hyper, True, False, False, True, bool(peak)
        )
