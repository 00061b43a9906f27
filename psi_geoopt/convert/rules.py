r"""The structural rules: how each operation transforms :math:`F \odot x + O` (see :mod:`.flow`).

:data:`RULES` maps an operation of a traced graph to its rule: a module class (looked up along
the module's class hierarchy), a function, or the name of a tensor method. A rule receives the
:class:`~.flow.Walk` and the node, whose inputs have their states, and returns the node's state:
a :class:`~.flow.Flow`, a :class:`~.flow.Rejected` with the reason, a :class:`~.flow.Removed`
where a normalization removes the scale, or ``None`` where the value does not depend on the
weight. An operation missing from the table rejects the weight.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from .flow import (
    CONSTANT_RTOL,
    Flow,
    Rejected,
    Removed,
    State,
    Walk,
    argument,
    as_tuple,
    channel_factors,
    compact,
    constant_along,
    factor_of,
    largest_along,
    offset_or_zeros,
    shift_of,
    where,
)

Rule = Callable[[Walk, fx.Node], State]

LINEAR_MODULES: dict[type[nn.Module], str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv",
    nn.ConvTranspose1d: "conv_transpose",
    nn.ConvTranspose2d: "conv_transpose",
    nn.ConvTranspose3d: "conv_transpose",
}
"""Modules whose ``weight`` is a candidate, and the kind of linear map they compute."""

LINEAR_FUNCTIONS: dict[Callable, str] = {
    F.linear: "linear",
    **{getattr(F, f"conv{d}d"): "conv" for d in (1, 2, 3)},
    **{getattr(F, f"conv_transpose{d}d"): "conv_transpose" for d in (1, 2, 3)},
}
"""Functions whose ``weight`` argument is a candidate, and their kind of linear map."""

NORMALIZATION_MODULES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)
NORMALIZATION_EPS: dict[Callable, int] = {
    F.batch_norm: 7,
    F.instance_norm: 7,
    F.layer_norm: 4,
    F.group_norm: 4,
    F.rms_norm: 3,
}
"""Functional normalizations and the position of their ``eps`` argument."""


def linear_kind(module: nn.Module) -> str | None:
    """``linear``, ``conv`` or ``conv_transpose`` for the linear-map modules, else None."""
    for cls in type(module).__mro__:
        if cls in LINEAR_MODULES:
            return LINEAR_MODULES[cls]
    return None


def rule_for(walk: Walk, node: fx.Node) -> Rule | None:
    """The rule of ``node``'s operation, None where the table has none."""
    if node.op == "call_module":
        for cls in type(walk.module(node)).__mro__:
            if cls in RULES:
                return RULES[cls]
        return None
    if node.op in ("call_function", "call_method"):
        return RULES.get(node.target)
    return None


def unsupported(walk: Walk, node: fx.Node) -> Rejected:
    """The reason for an operation without a rule."""
    if node.op == "call_module":
        name = type(walk.module(node)).__name__
        return Rejected(f"{name} {where(node)} is not positively homogeneous")
    if node.op == "call_method":
        return Rejected(f"method {node.target!r} {where(node)} is not supported")
    return Rejected(
        f"{getattr(node.target, '__name__', node.target)} {where(node)} is not supported"
    )


# ------------------------------------------------------------------------------ the rules


def shape_query(walk: Walk, node: fx.Node) -> State:
    """Metadata of a tensor (``size``, ``shape``), not its values: never scaled."""
    return None


def homogeneous(walk: Walk, node: fx.Node) -> State:
    """ReLU, LeakyReLU, PReLU, dropout: :math:`g(Fx) = F g(x)` for :math:`F > 0`, if O = 0."""
    flow = walk.state(node.args[0])
    if not isinstance(flow, Flow):
        return Rejected(f"used as a parameter of a nonlinearity {where(node)}")
    if flow.offset is not None:
        return Rejected(f"a shifted value goes through a nonlinearity {where(node)}")
    return flow


def move(walk: Walk, node: fx.Node) -> State:
    """Data movement: the same operation applied to F and O."""
    source = walk.state(node.args[0])
    if node.target is operator.getitem and isinstance(source, tuple):
        return source[node.args[1]]  # a piece of chunk/split/var_mean
    flows = [s for s in tree_flatten(walk.states_of(node.args))[0] if isinstance(s, Flow)]
    factor = walk.substitute(node, factor_of)
    offset = None
    if any(s.offset is not None for s in flows):
        offset = walk.substitute(node, shift_of)
    if isinstance(factor, (tuple, list)):
        offsets = offset if offset is not None else [None] * len(factor)
        return tuple(Flow(f, o) for f, o in zip(factor, offsets, strict=True))
    return Flow(factor, offset, all(s.weight for s in flows))


def shaped_like(walk: Walk, node: fx.Node) -> State:
    """``x.reshape_as(y)``, ``view_as``, ``expand_as``: only the shape of ``y`` is used."""
    flow = walk.state(node.args[0])
    if flow is None:
        return None
    if not isinstance(flow, Flow):
        return Rejected(f"cannot follow {node.op} {node.name!r}")
    shape = walk.values[node].shape
    if node.target == "expand_as":
        return Flow(
            flow.factor.expand(shape),
            None if flow.offset is None else flow.offset.expand(shape),
            flow.weight,
        )
    return Flow(
        flow.factor.reshape(shape),
        None if flow.offset is None else flow.offset.reshape(shape),
        flow.weight,
    )


def concatenate(walk: Walk, node: fx.Node) -> State:
    """``cat``/``stack``: other inputs pass with F = 1 and O = 0."""

    def pieces(pick, fill):
        return [
            pick(walk.states[t]) if isinstance(walk.state(t), Flow) else fill(walk.values[t])
            for t in node.args[0]
        ]

    rest = node.args[1:]
    kwargs = fx.node.map_arg(node.kwargs, lambda a: walk.values[a])
    factor = node.target(pieces(lambda s: s.factor, torch.ones_like), *rest, **kwargs)
    offset = None
    if any(
        isinstance(walk.state(t), Flow) and walk.state(t).offset is not None for t in node.args[0]
    ):
        offset = node.target(pieces(offset_or_zeros, torch.zeros_like), *rest, **kwargs)
    return Flow(factor, offset)


def linear(
    walk: Walk,
    node: fx.Node,
    kind: str,
    w_state: State,
    bias: torch.Tensor | None,
    groups: int,
) -> State:
    r"""A linear map :math:`y = W * x + b`; the flow may enter through ``x`` and/or ``W``."""
    out = walk.values[node]
    x_state = walk.state(node.args[0])
    if w_state is not None and (not isinstance(w_state, Flow) or w_state.offset is not None):
        return Rejected(f"the weight is transformed before use {where(node)}")
    factor = torch.ones((1,) * out.dim(), dtype=out.dtype, device=out.device)
    shifted = isinstance(x_state, Flow) and x_state.offset is not None
    weight_rank = _weight_rank(walk, node, w_state)
    channel_axis = out.dim() - 1 if kind == "linear" else out.dim() - weight_rank + 1
    if isinstance(x_state, Flow):
        n_contracted = 1 if kind == "linear" else weight_rank - 1
        rank = x_state.factor.dim()
        contracted = list(range(rank - n_contracted, rank))
        if not constant_along(x_state.factor, contracted):
            return Rejected(f"channels with different factors are mixed {where(node)}")
        factor = largest_along(x_state.factor, contracted)
        if w_state is not None and shifted:
            return Rejected(f"a shifted input meets the scaled weight {where(node)}")
    if w_state is not None:
        per_channel = channel_factors(w_state.factor, kind, groups)
        if per_channel is None:
            return Rejected(f"the weight's groups are not output channels {where(node)}")
        shape = [1] * out.dim()
        shape[channel_axis] = per_channel.numel()
        factor = factor * per_channel.reshape(shape)
    offset = None
    if shifted:  # W * O + b, with the weight's recorded value (O does not scale with it)
        offset = walk.substitute(node, lambda _, n: walk.values[n], first=x_state.offset)
    elif bias is not None:
        shape = [1] * out.dim()
        shape[channel_axis] = bias.numel()
        offset = bias.detach().to(out).reshape(shape).expand(out.shape)
    return Flow(factor.expand(out.shape), offset)


def _weight_rank(walk: Walk, node: fx.Node, w_state: State) -> int:
    if w_state is not None:
        return w_state.factor.dim()
    if node.op == "call_module":
        return walk.module(node).weight.dim()
    return walk.values[node.args[1]].dim()


def linear_module(walk: Walk, node: fx.Node) -> State:
    """``Linear``, ``Conv*d``, ``ConvTranspose*d``: the probed weight may be theirs."""
    module = walk.module(node)
    if any(p is walk.weight for p in module.parameters() if p is not module.weight):
        return Rejected(f"used as a bias {where(node)}")
    w_state = walk.weight_flow if module.weight is walk.weight else None
    groups = getattr(module, "groups", 1)
    return linear(walk, node, linear_kind(module), w_state, module.bias, groups)


def linear_function(walk: Walk, node: fx.Node) -> State:
    """``F.linear``, ``F.conv*d``, ``F.conv_transpose*d``."""
    kind = LINEAR_FUNCTIONS[node.target]
    b_node = argument(node, 2, "bias")
    if walk.state(b_node) is not None:
        return Rejected(f"used as a bias {where(node)}")
    w_state = walk.state(argument(node, 1, "weight"))
    groups = argument(node, 6, "groups", 1) if kind != "linear" else 1
    bias = walk.values[b_node] if isinstance(b_node, fx.Node) else b_node
    return linear(walk, node, kind, w_state, bias, groups)


def normalized(
    walk: Walk,
    node: fx.Node,
    axes: list[int],
    removes_offset: bool = True,
    batch_statistics: bool = True,
    num_groups: int | None = None,
) -> State:
    """A normalization over ``axes`` of its first argument: removes F and O constant along them.

    ``removes_offset``: it subtracts the mean (RMSNorm does not); ``batch_statistics``: it
    normalizes with statistics of the batch (not running ones, which keep the scale);
    ``num_groups``: GroupNorm, whose slices are groups of channels (``axes`` then index the
    value reshaped to ``(batch, num_groups, -1)``).
    """
    flow = walk.state(node.args[0])
    parameters = [n for n in node.all_input_nodes if n is not node.args[0]]
    if not isinstance(flow, Flow) or any(walk.state(n) is not None for n in parameters):
        return Rejected(f"used in the parameters of a normalization {where(node)}")
    if not batch_statistics:
        return Rejected(f"a normalization with running statistics {where(node)} keeps the scale")
    factor, offset = flow.factor, flow.offset
    if num_groups is not None:
        factor = factor.reshape(factor.shape[0], num_groups, -1)
        offset = None if offset is None else offset.reshape(offset.shape[0], num_groups, -1)
    if not constant_along(factor, axes):
        return Rejected(f"the factor varies inside the normalized slices {where(node)}")
    if offset is not None:
        if not removes_offset:
            return Rejected(f"a shift is not removed by the normalization {where(node)}")
        if not constant_along(offset, axes):
            return Rejected(f"a shift varies inside the normalized slices {where(node)}")
    if flow.weight:
        return Removed(f"weight standardization {where(node)}")
    if node.op == "call_module":
        return Removed(f"{node.target} ({type(walk.module(node)).__name__})")
    return Removed(f"{getattr(node.target, '__name__', node.target)}() at {node.name!r}")


def _rank(walk: Walk, node: fx.Node) -> int:
    return walk.values[node.args[0]].dim()


def batch_norm_module(walk: Walk, node: fx.Node) -> State:
    module = walk.module(node)
    batch_statistics = module.training or module.running_mean is None
    axes = [a for a in range(_rank(walk, node)) if a != 1]
    return normalized(walk, node, axes, batch_statistics=batch_statistics)


def instance_norm_module(walk: Walk, node: fx.Node) -> State:
    module = walk.module(node)
    batch_statistics = module.training or not module.track_running_stats
    d, rank = int(type(module).__name__[-2]), _rank(walk, node)
    return normalized(walk, node, list(range(rank - d, rank)), batch_statistics=batch_statistics)


def layer_norm_module(walk: Walk, node: fx.Node) -> State:
    module, rank = walk.module(node), _rank(walk, node)
    axes = list(range(rank - len(module.normalized_shape), rank))
    return normalized(walk, node, axes, not isinstance(module, nn.RMSNorm), True)


def group_norm_module(walk: Walk, node: fx.Node) -> State:
    return normalized(walk, node, [2], num_groups=walk.module(node).num_groups)


def batch_norm_function(walk: Walk, node: fx.Node) -> State:
    batch_statistics = bool(argument(node, 5, "training", False)) or (
        argument(node, 1, "running_mean") is None
    )
    axes = [a for a in range(_rank(walk, node)) if a != 1]
    return normalized(walk, node, axes, batch_statistics=batch_statistics)


def instance_norm_function(walk: Walk, node: fx.Node) -> State:
    batch_statistics = bool(argument(node, 5, "use_input_stats", True))
    axes = list(range(2, _rank(walk, node)))
    return normalized(walk, node, axes, batch_statistics=batch_statistics)


def layer_norm_function(walk: Walk, node: fx.Node) -> State:
    normalized_shape = argument(node, 1, "normalized_shape")
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    rank = _rank(walk, node)
    axes = list(range(rank - count, rank))
    return normalized(walk, node, axes, node.target is not F.rms_norm, True)


def group_norm_function(walk: Walk, node: fx.Node) -> State:
    return normalized(walk, node, [2], num_groups=argument(node, 1, "num_groups"))


def pooled(walk: Walk, node: fx.Node, d: int, padded_average: bool) -> State:
    """Max/average pooling over the last ``d`` axes: F and O must be constant in the windows."""
    flow = walk.state(node.args[0])
    if not isinstance(walk.values[node], torch.Tensor):
        return Rejected(f"pooling with indices {where(node)}")
    axes = list(range(flow.factor.dim() - d, flow.factor.dim()))
    out_shape = walk.values[node].shape
    if not constant_along(flow.factor, axes):
        return Rejected(f"the factor varies inside the pooling windows {where(node)}")
    factor = largest_along(flow.factor, axes).expand(out_shape)
    offset = None
    if flow.offset is not None:
        if padded_average:
            return Rejected(f"a shift is averaged with zero padding {where(node)}")
        if not constant_along(flow.offset, axes):
            return Rejected(f"the shift varies inside the pooling windows {where(node)}")
        offset = largest_along(flow.offset, axes).expand(out_shape)
    return Flow(factor, offset)


def pool_module(walk: Walk, node: fx.Node) -> State:
    module = walk.module(node)
    padded_average = isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) and any(
        p != 0 for p in as_tuple(module.padding)
    )
    return pooled(walk, node, int(type(module).__name__[-2]), padded_average)


def _other_inputs_depend(walk: Walk, node: fx.Node) -> bool:
    return any(walk.state(n) is not None for n in node.all_input_nodes if n is not node.args[0])


def _reduced_axes(node: fx.Node, rank: int) -> list[int]:
    """The axes a reduction (``mean``, ``var``, ``std``...) of a rank-``rank`` tensor runs over."""
    dims = argument(node, 1, "dim")
    if dims is None or isinstance(dims, bool):  # var(x, unbiased) reduces over everything
        return list(range(rank))
    return sorted(d % rank for d in as_tuple(dims))


def mean(walk: Walk, node: fx.Node) -> State:
    """``mean`` over axes along which F is constant."""
    flow = walk.state(node.args[0])
    if not isinstance(flow, Flow) or _other_inputs_depend(walk, node):
        return Rejected(f"used in the arguments of a mean {where(node)}")
    if not constant_along(flow.factor, _reduced_axes(node, flow.factor.dim())):
        return Rejected(f"channels with different factors are averaged {where(node)}")
    factor = walk.substitute(node, factor_of)
    offset = None if flow.offset is None else walk.substitute(node, shift_of)
    return Flow(factor, offset, flow.weight)


def moment(walk: Walk, node: fx.Node, power: int, with_mean: bool = False) -> State:
    r"""``var`` (``power=2``), ``std`` (1), ``var_mean``/``std_mean`` (``with_mean``) over axes
    along which F and O are constant: :math:`F^{power}` times that of x, O removed."""
    flow = walk.state(node.args[0])
    if not isinstance(flow, Flow) or _other_inputs_depend(walk, node):
        return Rejected(f"used in the arguments of a variance {where(node)}")
    axes = _reduced_axes(node, flow.factor.dim())
    if not constant_along(flow.factor, axes):
        return Rejected(f"channels with different factors share a variance {where(node)}")
    if flow.offset is not None and not constant_along(flow.offset, axes):
        return Rejected(f"a shift varies inside the slices of a variance {where(node)}")
    value = walk.values[node]
    shape = (value[0] if with_mean else value).shape
    factor = largest_along(flow.factor, axes).reshape(shape)
    spread = Flow(factor**power)
    if not with_mean:
        return spread
    offset = None
    if flow.offset is not None:
        offset = largest_along(flow.offset, axes).reshape(shape)
    return spread, Flow(factor, offset, flow.weight)


def power(walk: Walk, node: fx.Node, exponent: float | None = None) -> State:
    r""":math:`x^p` (``sqrt``, ``rsqrt``, ``square``, ``pow`` by a number): :math:`F^p` if O = 0."""
    flow = walk.state(node.args[0])
    if exponent is None:
        exponent = argument(node, 1, "exponent")
    if not isinstance(flow, Flow) or not isinstance(exponent, (int, float)):
        return Rejected(f"a power with an exponent computed from the weight {where(node)}")
    if flow.offset is not None:
        return Rejected(f"a shifted value is raised to a power {where(node)}")
    return Flow(flow.factor**exponent)


def add(walk: Walk, node: fx.Node) -> State:
    """A sum: a tensor not computed from the weight adds to O; two flows need the same F.

    The ``eps`` added to a variance or a standard deviation before dividing by it (found
    when tracing) is ignored, as the ``eps`` of the normalization layers is.
    """
    first, second = (walk.state(a) for a in node.args[:2])
    flows = [s for s in (first, second) if isinstance(s, Flow)]
    if node in walk.eps_additions:
        return flows[0]
    if len(node.args) > 2 or node.kwargs:
        return Rejected(f"add with extra arguments {where(node)}")
    out_shape = walk.values[node].shape
    if len(flows) == 2 and not bool(
        torch.isclose(compact(first.factor), compact(second.factor), rtol=1e-12, atol=0).all()
    ):
        return Rejected(f"added to a value scaled differently {where(node)}")
    factor = flows[0].factor.expand(out_shape)
    weight = all(f.weight for f in flows)
    if len(flows) == 2 and all(f.offset is None for f in flows):
        return Flow(factor, None, weight)
    return Flow(factor, walk.substitute(node, shift_of), weight)


def multiply(walk: Walk, node: fx.Node, divide: bool = False) -> State:
    """A product: by a tensor not computed from the weight keeps F and multiplies O.

    Products and quotients of two values computed from the weight (without offsets) multiply
    or divide their factors; where the factors cancel (a value divided by its standard
    deviation: a standardization) the scale is removed.
    """
    first, second = (walk.state(a) for a in node.args[:2])
    out_shape = walk.values[node].shape
    if isinstance(first, Flow) and isinstance(second, Flow):
        if first.offset is not None or second.offset is not None:
            return Rejected(f"product of shifted values {where(node)}")
        factor = first.factor / second.factor if divide else first.factor * second.factor
        if bool(((compact(factor) - 1).abs() <= CONSTANT_RTOL).all()):
            kind = "weight standardization" if first.weight else "standardization"
            return Removed(f"{kind} {where(node)}")
        return Flow(factor.expand(out_shape))
    if divide and isinstance(second, Flow):  # c / (F x): F^-1 (c / x)
        if second.offset is not None:
            return Rejected(f"divided by a shifted value {where(node)}")
        return Flow(second.factor.reciprocal().expand(out_shape))
    flow = first if isinstance(first, Flow) else second
    offset = None
    if flow.offset is not None:
        offset = walk.substitute(node, shift_of)
    return Flow(flow.factor.expand(out_shape), offset, flow.weight)


def negate(walk: Walk, node: fx.Node) -> State:
    flow = walk.state(node.args[0])
    return Flow(flow.factor, None if flow.offset is None else -flow.offset, flow.weight)


# ------------------------------------------------------------------------------ the table

_divide = functools.partial(multiply, divide=True)

RULES: dict[object, Rule] = {
    # linear maps
    **dict.fromkeys(LINEAR_MODULES, linear_module),
    **dict.fromkeys(LINEAR_FUNCTIONS, linear_function),
    # normalizations
    nn.modules.batchnorm._BatchNorm: batch_norm_module,
    nn.modules.instancenorm._InstanceNorm: instance_norm_module,
    nn.GroupNorm: group_norm_module,
    nn.LayerNorm: layer_norm_module,
    nn.RMSNorm: layer_norm_module,
    F.batch_norm: batch_norm_function,
    F.instance_norm: instance_norm_function,
    F.layer_norm: layer_norm_function,
    F.rms_norm: layer_norm_function,
    F.group_norm: group_norm_function,
    # positively homogeneous nonlinearities
    **dict.fromkeys(
        (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d),
        homogeneous,
    ),
    **dict.fromkeys(
        (F.relu, torch.relu, F.leaky_relu, F.prelu, F.dropout, F.dropout1d, F.dropout2d),
        homogeneous,
    ),
    F.dropout3d: homogeneous,
    "relu": homogeneous,
    # pooling
    **dict.fromkeys(
        (
            *(getattr(nn, f"{kind}Pool{d}d") for kind in ("Max", "Avg") for d in (1, 2, 3)),
            *(getattr(nn, f"Adaptive{kind}Pool{d}d") for kind in ("Max", "Avg") for d in (1, 2, 3)),
        ),
        pool_module,
    ),
    **{
        getattr(F, f"{kind}_pool{d}d"): functools.partial(pooled, d=d, padded_average=kind == "avg")
        for kind in ("max", "avg", "adaptive_avg", "adaptive_max")
        for d in (1, 2, 3)
    },
    **dict.fromkeys((torch.mean, "mean"), mean),
    # statistics and powers (weight standardization)
    **dict.fromkeys((torch.var, "var"), functools.partial(moment, power=2)),
    **dict.fromkeys((torch.std, "std"), functools.partial(moment, power=1)),
    torch.var_mean: functools.partial(moment, power=2, with_mean=True),
    torch.std_mean: functools.partial(moment, power=1, with_mean=True),
    **dict.fromkeys((torch.sqrt, "sqrt"), functools.partial(power, exponent=0.5)),
    **dict.fromkeys((torch.rsqrt, "rsqrt"), functools.partial(power, exponent=-0.5)),
    **dict.fromkeys((torch.square, "square"), functools.partial(power, exponent=2)),
    **dict.fromkeys((operator.pow, torch.pow, "pow"), power),
    # data movement
    **dict.fromkeys((nn.Identity, nn.Flatten, nn.Unflatten), move),
    **dict.fromkeys(
        (
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
        ),
        move,
    ),
    **dict.fromkeys(
        (
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
        ),
        move,
    ),
    **dict.fromkeys(("reshape_as", "view_as", "expand_as"), shaped_like),
    **dict.fromkeys((torch.cat, torch.concat, torch.stack), concatenate),
    # shape queries
    getattr: shape_query,
    "size": shape_query,
    "dim": shape_query,
    "numel": shape_query,
    # arithmetic
    **dict.fromkeys(
        (operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub), add
    ),
    **dict.fromkeys(("add", "add_", "sub", "sub_"), add),
    **dict.fromkeys((operator.mul, operator.imul, torch.mul, "mul", "mul_"), multiply),
    **dict.fromkeys((operator.truediv, torch.div, "div", "div_"), _divide),
    **dict.fromkeys((operator.neg, torch.neg, "neg"), negate),
}
