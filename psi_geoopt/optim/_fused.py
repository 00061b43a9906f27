"""Which parameters take the fused PSI step, on which backend, and the bookkeeping around it."""

from __future__ import annotations

import importlib
from types import ModuleType

import geoopt
import numpy
import torch
from torch.autograd.graph import increment_version

from ..manifold import PSIManifold
from .kernels.eager import _compute_dtype

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _manifold_of(point: torch.Tensor, default: geoopt.Manifold) -> geoopt.Manifold:
    """The manifold of a :class:`geoopt.ManifoldParameter`; for any other tensor its attribute
    ``manifold`` if it has one (a parameter re-created by a wrapper such as FSDP2's
    ``fully_shard``, which keeps a tensor's value but not its class), else ``default``."""
    manifold = getattr(point, "manifold", None)
    return default if manifold is None or not isinstance(manifold, geoopt.Manifold) else manifold


def _fused_group_size(point: torch.Tensor, manifold: geoopt.Manifold) -> int | None:
    """The group size if ``point`` can take the fused PSI pass, else ``None``.

    The pass works on the groups as the rows of a ``(groups, group_size)`` view: a contiguous
    tensor in a floating dtype grouped along axis 0, or as a whole (``dim=None``). A
    :class:`~torch.distributed.tensor.DTensor` qualifies when it is grouped along axis 0 and
    every placement is ``Shard(0)`` or ``Replicate()`` (FSDP2's ``fully_shard``): each group
    then lives whole on one rank and the pass runs on the local rows, without communication.
    """
    if type(manifold) is not PSIManifold or point.dtype not in _FUSED_DTYPES:
        return None
    shape, numel = point.shape, point.numel()
    if not shape or numel == 0:
        return None
    if _is_dtensor(point):
        if manifold.dim is None or not point.to_local().is_contiguous():
            return None
        if not all(p.is_replicate() or p.is_shard(0) for p in point.placements):
            return None
    elif not point.is_contiguous():
        return None
    elif manifold.dim is None:
        return numel
    if manifold.dim % len(shape) != 0:
        return None
    return numel // shape[0]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (sharing its memory), any other tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


_KERNELS: dict[str, ModuleType | None] = {}


def _kernel_module(name: str) -> ModuleType | None:
    """The kernel module ``psi_geoopt.<name>`` (``triton_step``, ``numba_step``), imported on
    first use; ``None`` where its compiler is not installed, or for ``triton_step`` with
    PyTorch < 2.5."""
    if name not in _KERNELS:
        module = None
        if name != "kernels.triton" or torch.torch_version.TorchVersion(torch.__version__) >= "2.5":
            try:
                module = importlib.import_module(f"{__package__}.{name}")
            except ImportError:
                pass
        _KERNELS[name] = module
    return _KERNELS[name]


def _triton_step() -> ModuleType | None:
    return _kernel_module("kernels.triton")


def _numba_step(xp: ModuleType) -> ModuleType | None:
    """:mod:`psi_geoopt.numba_step` where it runs: for the NumPy views of CPU tensors
    (``xp`` NumPy, :func:`_algebra_module`) with Numba installed; else ``None``."""
    return _kernel_module("kernels.numba") if xp is numpy else None


def _takes_kernel(point: torch.Tensor, group_size: int) -> bool:
    """Whether the PSI step of ``point`` runs in the Triton kernel of
    :mod:`psi_geoopt.triton_step`: a CUDA tensor, not sharded (sharded groups run eagerly,
    the path tested with FSDP2), groups of at most ``MAX_ROW`` elements, Triton installed
    (PyTorch's CUDA builds on Linux bring it)."""
    if not point.is_cuda or _is_dtensor(point):
        return False
    module = _triton_step()
    return module is not None and group_size <= module.MAX_ROW


def _algebra_module(device: torch.device) -> ModuleType:
    """Where the per-group sums and scalar algebra of the PSI step of tensors on ``device``
    run (and the compiled loop of :mod:`psi_geoopt.numba_step`): NumPy on views of CPU
    tensors (the algebra is a few dozen operations on vectors of one entry per group, and
    NumPy's per-operation overhead is a fraction of PyTorch's), PyTorch elsewhere (NumPy
    would need a copy to the host and a synchronization)."""
    return numpy if device.type == "cpu" else torch


def _as_tensor(array) -> torch.Tensor:
    return torch.from_numpy(array) if isinstance(array, numpy.ndarray) else array


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
    compute = _compute_dtype(dtype)
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
