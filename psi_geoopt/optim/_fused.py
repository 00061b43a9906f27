r"""The fused PSI step of both optimizers: which parameters take it, and on which backend.

A parameter on :class:`~psi_geoopt.PSIManifold` takes the fused step when its groups are the
rows of a ``(groups, group_size)`` view (:func:`_fused_group_size`): five per-group sums and
closed forms (:mod:`._closed_form`) instead of the manifold's operations. The step of a
parameter group runs, with the group option ``compile``:

* in the Triton kernel of :mod:`.kernels.triton`, one launch for all tensors of a device and
  dtype: CUDA tensors, not sharded, groups of at most ``MAX_ROW`` elements (``compile`` not
  ``False``);
* in the Numba loop of :mod:`.kernels.numba`, one call per tensor: CPU tensors (``compile``
  ``None`` for SGD, not ``False`` for Adam);
* through :func:`torch.compile` (:mod:`.kernels.compiled`), SGD only, after a buffer's first
  step: ``compile=True``, or ``None`` for the groups whose fused parameters the kernels above
  leave with at least :data:`AUTO_COMPILE_NUMEL` elements together;
* else eagerly (:mod:`.kernels.eager`), the per-group algebra of all tensors of a device,
  dtype and step batched, in NumPy on CPU.

float16/bfloat16 tensors are computed in float32 (working copies, written back).
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import geoopt
import numpy
import torch
from torch.autograd.graph import increment_version

from ..manifold import PSIManifold
from .kernels import compiled, eager

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None

__all__ = ["AUTO_COMPILE_NUMEL", "psi_adam", "psi_sgd"]

AUTO_COMPILE_NUMEL = 2**20
"""Size (elements of fused PSI parameters in one group) from which ``compile=None`` runs the
PSI step through :func:`torch.compile` where no kernel of its own takes it (on CPU without
Numba, on devices other than CUDA)."""

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def psi_sgd(
    entries: list[tuple[torch.Tensor, torch.Tensor | None, int, bool]],
    *,
    compile: bool | None,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
) -> None:
    """The SGD step of ``(parameter, buffer, group_size, first)`` entries (``buffer`` ``None``
    without momentum, zeros at its ``first`` step), each on its backend."""
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov)
    kernel_tasks, host = [], []
    for entry in entries:
        takes_kernel = compile is not False and _takes_kernel(entry[0], entry[2])
        (kernel_tasks if takes_kernel else host).append(entry)
    numba_on_cpu = compile is None and _kernel_module("numba") is not None

    def by_numba(point: torch.Tensor) -> bool:
        return numba_on_cpu and point.device.type == "cpu"

    graph = compile
    if compile is None:
        graph = sum(p.numel() for p, *_ in host if not by_numba(p)) >= AUTO_COMPILE_NUMEL
    tasks, graphed = [], []
    for point, buffer, group_size, first in host:
        if graph and not first and not by_numba(point) and not _is_dtensor(point):
            graphed.append((point, buffer, group_size))
            continue
        x = _local(point.detach())
        if x.numel() == 0:  # a rank that holds no group of this parameter
            continue
        buffer = None if buffer is None else _local(buffer)
        tasks.append((x, _local(point.grad), buffer, group_size, first))
    # the kernel first: the GPU runs it while the host prepares the other updates
    if kernel_tasks:
        _triton_sgd(kernel_tasks, **hyper)
    batches: dict[tuple, tuple[list[tuple[torch.Tensor | None, ...]], list[int]]] = {}
    for x, grad, buffer, size, first in tasks:
        batch, sizes = batches.setdefault((x.device, x.dtype, first), ([], []))
        batch.append((x, grad, buffer))
        sizes.append(size)
    for (device, dtype, first), (batch, sizes) in batches.items():
        numba = compile is not False
        _host_step("psi_sgd_rows", batch, sizes, device, dtype, numba, first=first, **hyper)
    if graphed:
        compiled.psi_sgd(graphed, **hyper)


def psi_adam(
    entries: list[tuple[torch.Tensor, int, dict]],
    *,
    compile: bool | None,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    amsgrad: bool,
) -> None:
    r"""The Adam step of ``(parameter, group_size, state)`` entries, ``state["step"]`` already
    counted, batched by device, dtype and step count: on CUDA each batch one launch of the
    Triton kernel, on CPU each tensor one call of the Numba loop (``compile`` not ``False``),
    else eagerly."""
    moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 3 if amsgrad else 2]
    batches: dict[tuple, tuple[list[tuple[torch.Tensor, ...]], list[int]]] = {}
    kernel_batches: dict[tuple, list[tuple]] = {}
    for point, size, state in entries:
        key = (point.device, point.dtype, state["step"])
        if compile is not False and _takes_kernel(point, size):
            peak = state["max_exp_avg_sq"] if amsgrad else None
            kernel_batches.setdefault(key, []).append(
                (point, point.grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], peak, size)
            )
            continue
        batch, sizes = batches.setdefault(key, ([], []))
        batch.append((point.detach(), point.grad, *(state[key] for key in moments)))
        sizes.append(size)
    hyper = dict(lr=lr, betas=betas, eps=eps)
    for (_, _, step), batch in kernel_batches.items():
        _kernel_module("triton").psi_adam_step(batch, step=step, **hyper)
    for (device, dtype, step), (batch, sizes) in batches.items():
        numba = compile is not False
        _host_step("psi_adam_rows", batch, sizes, device, dtype, numba, step=step, **hyper)


def _host_step(
    name: str,
    batch: list[tuple[torch.Tensor | None, ...]],
    sizes: list[int],
    device: torch.device,
    dtype: torch.dtype,
    numba: bool,
    **hyper,
) -> None:
    """The step ``name`` (``psi_sgd_rows``, ``psi_adam_rows``) of the tensors of ``batch``
    (of one device and dtype; the group sizes ``sizes``) in the Numba loop where ``numba``
    and the tensors are on CPU with Numba installed, else eagerly; in the compute dtype."""
    xp = _algebra_module(device)
    work = _working_copies(batch, dtype)
    kernels = _kernel_module("numba") if numba and xp is numpy else None
    if kernels is not None:
        getattr(kernels, name)(_row_views(work, sizes, numpy), **hyper)
        _write_back(batch, work, written_around_autograd=True)
    else:
        getattr(eager, name)(_row_views(work, sizes, torch), xp=xp, **hyper)
        _write_back(batch, work)


def _triton_sgd(tasks: list[tuple[torch.Tensor, torch.Tensor | None, int, bool]], **hyper) -> None:
    """The SGD step of ``(parameter, buffer, group_size, first)`` entries (contiguous, not
    sharded) in the Triton kernel, one launch per device, dtype and ``first`` flag."""
    batches: dict[tuple, list[tuple]] = {}
    for point, buffer, group_size, first in tasks:
        entry = (point, point.grad.contiguous(), buffer, group_size)
        batches.setdefault((point.device, point.dtype, first), []).append(entry)
    for (_, _, first), batch in batches.items():
        _kernel_module("triton").psi_sgd_step(batch, first=first, **hyper)


def _manifold_of(point: torch.Tensor, default: geoopt.Manifold) -> geoopt.Manifold:
    """The manifold of a :class:`geoopt.ManifoldParameter`; for any other tensor its attribute
    ``manifold`` if it has one (a parameter re-created by a wrapper such as FSDP2's
    ``fully_shard``, which keeps a tensor's value but not its class), else ``default``."""
    manifold = getattr(point, "manifold", None)
    return default if manifold is None or not isinstance(manifold, geoopt.Manifold) else manifold


def _fused_group_size(point: torch.Tensor, manifold: geoopt.Manifold) -> int | None:
    """The group size if ``point`` can take the fused PSI pass, else ``None``.

    The pass works on the groups as the rows of a ``(groups, group_size)`` view: a contiguous
    tensor in a floating dtype whose points (the whole tensor, or its trailing ``ndim`` axes)
    are grouped along their first axis, or are one group each (``dim=None``). A
    :class:`~torch.distributed.tensor.DTensor` qualifies when every group lies inside one index
    of axis 0 and every placement is ``Shard(0)`` or ``Replicate()`` (FSDP2's ``fully_shard``):
    each group then lives whole on one rank and the pass runs on the local rows, without
    communication.
    """
    if type(manifold) is not PSIManifold or point.dtype not in _FUSED_DTYPES:
        return None
    shape, numel = point.shape, point.numel()
    point_rank = len(shape) if manifold.ndim is None else manifold.ndim
    if not shape or numel == 0 or point_rank > len(shape):
        return None
    point_shape = shape[len(shape) - point_rank :]
    if _is_dtensor(point):
        if (
            manifold.dim is None and point_rank == len(shape)
        ) or not point.to_local().is_contiguous():
            return None
        if not all(p.is_replicate() or p.is_shard(0) for p in point.placements):
            return None
    elif not point.is_contiguous():
        return None
    if manifold.dim is None:
        return math.prod(point_shape)
    if manifold.dim % point_rank != 0:
        return None
    return math.prod(point_shape[1:])


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (sharing its memory), any other tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


_KERNELS: dict[str, ModuleType | None] = {}


def _kernel_module(name: str) -> ModuleType | None:
    """The backend :mod:`.kernels.numba` or :mod:`.kernels.triton` (``name``), imported on first
    use; ``None`` where its compiler cannot be imported, or for Triton with PyTorch < 2.5."""
    if name not in _KERNELS:
        module = None
        if name != "triton" or torch.torch_version.TorchVersion(torch.__version__) >= "2.5":
            try:
                module = importlib.import_module(f"{__package__}.kernels.{name}")
            except ImportError:
                pass
        _KERNELS[name] = module
    return _KERNELS[name]


def _takes_kernel(point: torch.Tensor, group_size: int) -> bool:
    """Whether the PSI step of ``point`` runs in the Triton kernel of :mod:`.kernels.triton`: a
    CUDA tensor, not sharded (sharded groups run eagerly, the path tested with FSDP2), groups
    of at most ``MAX_ROW`` elements, Triton installed (PyTorch's CUDA builds on Linux bring
    it)."""
    if not point.is_cuda or _is_dtensor(point):
        return False
    module = _kernel_module("triton")
    return module is not None and group_size <= module.MAX_ROW


def _algebra_module(device: torch.device) -> ModuleType:
    """Where the per-group sums and scalar algebra of the eager PSI step of tensors on
    ``device`` run: NumPy on views of CPU tensors (the algebra is a few dozen operations on
    vectors of one entry per group, and NumPy's per-operation overhead is a fraction of
    PyTorch's), PyTorch elsewhere (NumPy would need a copy to the host and a
    synchronization)."""
    return numpy if device.type == "cpu" else torch


def _row_views(
    work: list[tuple[torch.Tensor | None, ...]], sizes: list[int], xp: ModuleType
) -> list[tuple[torch.Tensor | numpy.ndarray | None, ...]]:
    """The tensors of each tuple of ``work`` as ``(groups, size)`` rows, ``size`` the tuple's
    entry of ``sizes``: NumPy arrays sharing their memory (``xp`` NumPy; reshaped in NumPy,
    a fraction of PyTorch's per-call cost), else tensor views (a non-contiguous gradient
    is copied)."""
    if xp is numpy:
        return [
            tuple(None if t is None else t.numpy().reshape(-1, size) for t in tensors)
            for tensors, size in zip(work, sizes, strict=True)
        ]
    return [
        tuple(None if t is None else t.reshape(-1, size) for t in tensors)
        for tensors, size in zip(work, sizes, strict=True)
    ]


def _working_copies(
    batch: list[tuple[torch.Tensor | None, ...]], dtype: torch.dtype
) -> list[tuple[torch.Tensor | None, ...]]:
    """The tensors of ``batch``, all of ``dtype``, in the compute dtype: ``batch`` itself for
    float32 and float64, float32 copies of float16/bfloat16 ones (written back by
    :func:`_write_back`)."""
    compute = eager.compute_dtype(dtype)
    if compute == dtype:
        return batch
    return [tuple(None if t is None else t.to(compute) for t in views) for views in batch]


def _write_back(
    batch: list[tuple[torch.Tensor | None, ...]],
    work: list[tuple[torch.Tensor | None, ...]],
    *,
    written_around_autograd: bool = False,
) -> None:
    """Copy the working copies of :func:`_working_copies` back into the tensors of ``batch``
    (the gradient, second of each tuple, is only read). ``written_around_autograd``: the
    step wrote through NumPy views, so mark the tensors it wrote as modified in place, as
    PyTorch's in-place operations do, so that autograd still detects a backward through a
    graph that saved them."""
    for original, computed in zip(batch, work, strict=True):
        for target, source in zip(original, computed, strict=True):
            if target is None or target is original[1]:
                continue
            if source is not target:
                target.copy_(source)
            elif written_around_autograd:
                increment_version(target)
