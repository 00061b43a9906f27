r"""The value the structural test follows: :math:`F \odot x + O`, computed from the probed weight.

For one random draw of per-group factors :math:`c_k > 0` of the probed weight, every value of
the traced model that is computed from the weight is written :math:`F \odot x + O`, where
:math:`x` does not depend on the :math:`c_k`, the positive factor :math:`F` does and the offset
:math:`O` does not. :class:`Flow` holds :math:`F` and :math:`O` as tensors with the shapes of the
recorded activations; :class:`Rejected` marks a value that depends on the weight in a way no
normalization undoes, :class:`Removed` a normalization that removed the scale. A :class:`Walk`
holds the states of one run and applies a node's own operation to :math:`F` or :math:`O`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

CONSTANT_RTOL = 1e-9
"""Relative spread under which a factor or an offset counts as constant along some axes."""


@dataclass
class Flow:
    r"""A value computed from the probed weight: :math:`F \odot x + O` (``offset=None``: O = 0).

    ``weight``: a value of the weight itself (moved, centred, reduced), before any linear map.
    """

    factor: torch.Tensor
    offset: torch.Tensor | None = None
    weight: bool = False


@dataclass(frozen=True)
class Rejected:
    """A value that depends on the probed weight in a way no normalization undoes."""

    reason: str


@dataclass(frozen=True)
class Removed:
    """A normalization removed the scale (and any offset) of the value it received."""

    where: str


State = Flow | Rejected | Removed | tuple | None
"""What the structural test knows of a node: ``None`` where it does not depend on the weight,
a tuple of states for the pieces of ``chunk``/``split``."""


class Walk:
    """One run of the structural test: the states of the nodes for one weight and grouping.

    Parameters
    ----------
    graph_module : torch.fx.GraphModule
        the traced model
    values : dict
        the value of every node, recorded on the example inputs
    weight : torch.Tensor
        the probed weight (a parameter of ``graph_module``)
    weight_flow : Flow
        its factors: one per group, broadcast to the weight's shape
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        values: dict[fx.Node, object],
        weight: torch.Tensor,
        weight_flow: Flow,
    ):
        self.graph_module = graph_module
        self.values = values
        self.weight = weight
        self.weight_flow = weight_flow
        self.states: dict[fx.Node, State] = {}
        self.owners: set[fx.Node] = set()
        """the ``call_module`` nodes whose module holds the weight"""
        self.eps_additions: set[fx.Node] = set()
        """the nodes adding an ``eps`` to a variance or a standard deviation"""

    def module(self, node: fx.Node) -> nn.Module:
        return self.graph_module.get_submodule(node.target)

    def state(self, arg) -> State:
        """The state of an argument (``None`` for constants and nodes not computed from W)."""
        return self.states.get(arg) if isinstance(arg, fx.Node) else None

    def states_of(self, args):
        """``args`` with every node replaced by its state."""
        return fx.node.map_arg(args, lambda n: self.states.get(n))

    def substitute(self, node: fx.Node, pick, first: torch.Tensor | None = None):
        """``node``'s operation applied with ``pick(flow, input)`` in place of every flow input.

        ``first``, where given, replaces the first argument whatever its state.
        """

        def replace(arg):
            state, value = self.states.get(arg), self.values[arg]
            if isinstance(state, tuple):  # the pieces of chunk/split
                return type(value)(
                    pick(s, arg) if isinstance(s, Flow) else v
                    for s, v in zip(state, value, strict=True)
                )
            return pick(state, arg) if isinstance(state, Flow) else value

        args = fx.node.map_arg(node.args, replace)
        kwargs = fx.node.map_arg(node.kwargs, replace)
        if first is not None:
            args = (first, *args[1:])
        if node.op == "call_module":
            return self.module(node)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def factor_of(flow: Flow, _: fx.Node) -> torch.Tensor:
    return flow.factor.contiguous()  # factors are often expanded views: make `view` work


def shift_of(flow: Flow, _: fx.Node) -> torch.Tensor:
    return offset_or_zeros(flow).contiguous()


def offset_or_zeros(flow: Flow) -> torch.Tensor:
    return torch.zeros_like(flow.factor) if flow.offset is None else flow.offset


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its broadcast copies: size 1 along the axes it is expanded along."""
    index = tuple(
        slice(0, 1) if stride == 0 and size > 1 else slice(None)
        for stride, size in zip(t.stride(), t.shape, strict=True)
    )
    return t[index]


def constant_along(t: torch.Tensor, axes: list[int]) -> bool:
    """Whether ``t`` is constant along ``axes``, up to ``CONSTANT_RTOL`` of its largest entry."""
    t = compact(t)
    axes = [a for a in axes if t.shape[a] > 1]
    if not axes or t.numel() == 0:
        return True
    spread = (t.amax(dim=axes) - t.amin(dim=axes)).abs().max()
    rtol = max(CONSTANT_RTOL, 1000 * torch.finfo(t.dtype).eps)
    return bool(spread <= rtol * t.abs().max())


def largest_along(t: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """``t.amax(dim=axes, keepdim=True)``, computed without ``t``'s broadcast copies."""
    axes = [a % t.dim() for a in axes]
    shape = [1 if a in axes else size for a, size in enumerate(t.shape)]
    if not axes:
        return t
    return compact(t).amax(dim=axes, keepdim=True).expand(shape)


def channel_factors(factor: torch.Tensor, kind: str, groups: int) -> torch.Tensor | None:
    """The weight's factor per output channel, or None where it is not one per channel."""
    if kind == "conv_transpose":
        if constant_along(factor, list(range(factor.dim()))):
            return factor.flatten()[:1]
        if groups != 1 or not constant_along(factor, [0, *range(2, factor.dim())]):
            return None
        return largest_along(factor, [0, *range(2, factor.dim())]).flatten()
    rest = list(range(1, factor.dim()))
    if not constant_along(factor, rest):
        return None
    return largest_along(factor, rest).flatten()


def fetch(module: nn.Module, target: str):
    """The attribute of ``module`` at the dotted path ``target``."""
    for atom in target.split("."):
        module = getattr(module, atom)
    return module


def argument(node: fx.Node, position: int, keyword: str, default=None):
    """The argument of ``node`` given at ``position`` or as ``keyword``."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


def as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def where(node: fx.Node) -> str:
    """The place of ``node`` in a reason."""
    return f"at {node.op} {node.name!r}"
