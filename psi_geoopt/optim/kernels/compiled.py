"""The fused PSI step through :func:`torch.compile`: one graph per parameter group.

The eager step of :mod:`.eager` in PyTorch operations, per-group sums, closed forms and update
traced together, which inductor fuses into one reduction pass and one elementwise pass per
tensor (and, with combo kernels, independent tensors into shared kernels). The default where
neither the Triton kernel nor the Numba loop takes the step, for groups of at least
:data:`~psi_geoopt.optim.AUTO_COMPILE_NUMEL` elements.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .eager import _psi_apply, _psi_sums, compute_dtype, psi_coefficients

__all__ = ["psi_sgd"]


def _psi_fused_step(
    x: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None, **hyper
) -> None:
    """One tensor's step (not a buffer's first) on ``(groups, group_size)`` views: the sums,
    the coefficients and :func:`_psi_apply` on copies in the compute dtype (the tensors
    themselves in float32 and float64), which :func:`torch.compile` fuses into one reduction
    pass and one elementwise pass. float16/bfloat16 are computed in float32."""
    dtype = compute_dtype(x.dtype)
    point, gradient = x.to(dtype), grad.to(dtype)
    moment = None if buffer is None else buffer.to(dtype)
    coefficients = psi_coefficients(_psi_sums(point, gradient, moment), first=False, **hyper)
    _psi_apply(point, gradient, moment, coefficients, first=False, nesterov=hyper["nesterov"])
    if point is not x:
        x.copy_(point)
    if moment is not buffer:
        buffer.copy_(moment)


def _psi_fused_steps(
    xs: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor | None], **hyper
) -> None:
    """:func:`_psi_fused_step` for every tensor of a parameter group, given as
    ``(groups, group_size)`` views: one call, so that :func:`torch.compile` makes one graph
    of the whole step and the per-call overhead (guards, kernel launches) is paid once per
    step rather than once per tensor. (The views are made outside the graph: reshaping
    inside it made inductor's CPU kernels three times slower.)"""
    for x, grad, buffer in zip(xs, grads, buffers, strict=True):
        _psi_fused_step(x, grad, buffer, **hyper)


def psi_sgd(
    entries: list[tuple[torch.Tensor, torch.Tensor | None, int]], *, lr: float, **hyper
) -> None:
    """The PSI step of ``(parameter, buffer, group_size)`` entries (not a buffer's first step,
    contiguous, not sharded) through :func:`_compiled_psi_steps`, one call per device and
    compute dtype.

    The learning rate is passed as a tensor, a graph input, so that a scheduler changing it
    causes no recompilation.
    """
    batches: dict[tuple[torch.device, torch.dtype], list] = {}
    for entry in entries:
        batches.setdefault((entry[0].device, compute_dtype(entry[0].dtype)), []).append(entry)
    for (device, dtype), batch in batches.items():
        # in the compute dtype: a float64 scalar would keep inductor's CPU kernels from
        # vectorizing float32 arithmetic
        step_size = torch.tensor(lr, dtype=dtype, device=device)
        _compiled_psi_steps()(
            [point.detach().view(-1, size) for point, _, size in batch],
            [point.grad.reshape(-1, size) for point, _, size in batch],
            [None if buffer is None else buffer.view(-1, size) for _, buffer, size in batch],
            lr=step_size,
            **hyper,
        )


_COMPILED: dict[str, Callable[..., None]] = {}


def _compiled_psi_steps() -> Callable[..., None]:
    """:func:`_psi_fused_steps` through :func:`torch.compile`; eager where compilation fails.

    The graph is specialised to the shapes of the parameter group (a model's parameters keep
    theirs). Inductor's combo kernels (horizontal fusion of the tensors' kernels, where this
    version has them) cut the number of kernel launches: on an H200 the ResNet-50 step went
    from 5.9x to 4.3x the time of ``torch.optim.SGD``, on CPUs they are neutral to slightly
    faster (``benchmarks/RESULTS.md``). A buffer's first step runs eagerly: it happens once,
    and the C++ code generation of torch 2.13 fails on that variant of the graph.
    """
    if "steps" not in _COMPILED:
        options = {"combo_kernels": True} if _inductor_has("combo_kernels") else None
        compiled = torch.compile(_psi_fused_steps, dynamic=False, options=options)

        def steps(*args, **kwargs) -> None:
            if _COMPILED.get("failed"):
                return _psi_fused_steps(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except Exception as error:  # a missing compiler or an unsupported backend
                warnings.warn(
                    f"RiemannianSGD(compile=True): torch.compile failed ({error!r:.200}); "
                    "running the step eagerly",
                    RuntimeWarning,
                    stacklevel=4,
                )
                _COMPILED["failed"] = steps
                return _psi_fused_steps(*args, **kwargs)

        _COMPILED["steps"] = steps
    return _COMPILED["steps"]


def _inductor_has(option: str) -> bool:
    try:
        from torch._inductor import config
    except ImportError:
        return False
    return hasattr(config, option)
