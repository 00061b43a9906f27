"""The operations the structural test of :mod:`psi_geoopt.convert` knows, and the value it
follows through them: :math:`F \\odot x + O` computed from the probed weight."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

_CONSTANT_RTOL = 1e-9

_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORM = (nn.modules.batchnorm._BatchNorm,)
_INSTANCE_NORM = (nn.modules.instancenorm._InstanceNorm,)
_NORMALIZATIONS = (*_BATCH_NORM, *_INSTANCE_NORM, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_DATA_MOVEMENT_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten)

_HOMOGENEOUS_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.prelu,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
}
_HOMOGENEOUS_METHODS = {"relu"}
_POOL_FUNCTIONS = {
    getattr(F, f"{kind}_pool{d}d"): d
    for kind in ("max", "avg", "adaptive_avg", "adaptive_max")
    for d in (1, 2, 3)
}
_DATA_MOVEMENT_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.movedim,
    torch.narrow,
    torch.chunk,
    torch.split,
    operator.getitem,
}
_DATA_MOVEMENT_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "t",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "clone",
    "movedim",
    "narrow",
    "chunk",
    "split",
    "expand",
}
#: metadata of a tensor (not its values): never scaled
_SHAPE_QUERIES = {
    ("call_function", getattr),
    ("call_method", "size"),
    ("call_method", "dim"),
    ("call_method", "numel"),
}
_CONCATENATIONS = {torch.cat, torch.concat, torch.stack}
_ADDITIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MULTIPLICATIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}
_MUL_METHODS = {"mul", "mul_", "div", "div_"}
_NEGATIONS = {operator.neg, torch.neg}
_LINEAR_FUNCTIONS = {F.linear: "linear"}
_LINEAR_FUNCTIONS.update({getattr(F, f"conv{d}d"): "conv" for d in (1, 2, 3)})
_LINEAR_FUNCTIONS.update({getattr(F, f"conv_transpose{d}d"): "conv_transpose" for d in (1, 2, 3)})
#: functional normalizations: name -> position of ``eps`` in the positional arguments
_NORM_FUNCTIONS = {
    F.batch_norm: 7,
    F.instance_norm: 7,
    F.layer_norm: 4,
    F.group_norm: 4,
    F.rms_norm: 3,
}


@dataclass
class _Flow:
    r"""A value computed from the probed weight: :math:`F \odot x + O` (``offset=None``: O = 0)."""

    factor: torch.Tensor
    offset: torch.Tensor | None = None


class _Bad:
    """A value that depends on the probed weight in a way no normalization undoes."""

    def __init__(self, reason: str):
        self.reason = reason


_NORMALIZED = object()


def _removed(flow: _Flow, axes: list[int], removes_offset: bool, where: str):
    if not _constant_along(flow.factor, axes):
        return _Bad(f"the factor varies inside the normalized slices {where}")
    if flow.offset is not None:
        if not removes_offset:
            return _Bad(f"a shift is not removed by the normalization {where}")
        if not _constant_along(flow.offset, axes):
            return _Bad(f"a shift varies inside the normalized slices {where}")
    return _NORMALIZED


def _homogeneous(flow: _Flow | None, where: str):
    if not isinstance(flow, _Flow):
        return _Bad(f"used as a parameter of a nonlinearity {where}")
    if flow.offset is not None:
        return _Bad(f"a shifted value goes through a nonlinearity {where}")
    return flow


def _factor(flow: _Flow, _: fx.Node) -> torch.Tensor:
    return flow.factor.contiguous()  # factors are often expanded views: make `view` work


def _shift(flow: _Flow, _: fx.Node) -> torch.Tensor:
    return _offset_or_zeros(flow).contiguous()


def _offset_or_zeros(flow: _Flow) -> torch.Tensor:
    return torch.zeros_like(flow.factor) if flow.offset is None else flow.offset


def _constant_along(t: torch.Tensor, axes: list[int]) -> bool:
    if not axes or t.numel() == 0:
        return True
    spread = (t.amax(dim=axes) - t.amin(dim=axes)).abs().max()
    rtol = max(_CONSTANT_RTOL, 1000 * torch.finfo(t.dtype).eps)
    return bool(spread <= rtol * t.abs().max())


def _channel_factors(factor: torch.Tensor, kind: str, groups: int) -> torch.Tensor | None:
    """The weight's factor per output channel, or None where it is not one per channel."""
    if kind == "conv_transpose":
        if _constant_along(factor, list(range(factor.dim()))):
            return factor.flatten()[:1]
        if groups != 1 or not _constant_along(factor, [0, *range(2, factor.dim())]):
            return None
        return factor.amax(dim=[0, *range(2, factor.dim())])
    rest = list(range(1, factor.dim()))
    if not _constant_along(factor, rest):
        return None
    return factor.amax(dim=rest) if rest else factor


def _states_of(args, states):
    return fx.node.map_arg(args, lambda n: states.get(n))


def _linear_kind(module: nn.Module) -> str | None:
    if isinstance(module, _LINEAR):
        return "linear"
    if isinstance(module, _CONV):
        return "conv"
    if isinstance(module, _CONV_TRANSPOSE):
        return "conv_transpose"
    return None


def _argument(node: fx.Node, position: int, keyword: str, default=None):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
