"""What the probe looks for in a model: candidate weights, normalizations, the ``eps`` of a
hand-written standardization.

The candidates are the weights of linear maps (:data:`~.rules.LINEAR_MODULES`,
:data:`~.rules.LINEAR_FUNCTIONS`), also where the weight argument of a linear function is
computed from a parameter of the same shape without the inputs (weight standardization): that
parameter is then the candidate.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from .flow import argument, fetch
from .rules import LINEAR_FUNCTIONS, NORMALIZATION_EPS, NORMALIZATION_MODULES, linear_kind

Groupings = tuple[int | None, ...]

_ADDITIONS = {operator.add, torch.add, "add"}
_MOMENTS = {torch.var, torch.std, "var", "std"}
_MOMENTS_WITH_MEAN = {torch.var_mean, torch.std_mean}
MAX_EPS = 1e-2
"""The largest number added to a variance that counts as its ``eps``."""


def is_eps_addition(node: fx.Node) -> bool:
    """``spread + eps``: a number in (0, ``MAX_EPS``] added to a variance or standard deviation.

    A spread is the result of ``var``/``std`` (or of ``var_mean``/``std_mean``), the ``mean``
    of a square, or the square root of a spread.
    """
    if node.op not in ("call_function", "call_method") or node.target not in _ADDITIONS:
        return False
    if len(node.args) != 2 or node.kwargs:
        return False
    numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    others = [a for a in node.args if isinstance(a, fx.Node)]
    return (
        len(numbers) == 1
        and 0 < numbers[0] <= MAX_EPS
        and len(others) == 1
        and (_is_spread(others[0]))
    )


def _is_spread(node: fx.Node, depth: int = 0) -> bool:
    if depth > 3 or node.op not in ("call_function", "call_method"):
        return False
    target, args = node.target, node.args
    if target in _MOMENTS:
        return True
    if target is operator.getitem and isinstance(args[0], fx.Node):
        return args[0].target in _MOMENTS_WITH_MEAN and args[1] == 0
    if target in (torch.sqrt, "sqrt"):
        return _is_spread(args[0], depth + 1)
    if target in (torch.mean, "mean") and isinstance(args[0], fx.Node):
        square = args[0]
        if square.target in (torch.square, "square"):
            return True
        if square.target in (operator.pow, torch.pow, "pow"):
            return len(square.args) > 1 and square.args[1] == 2
        return square.target in (operator.mul, torch.mul, "mul") and (
            len(square.args) == 2 and square.args[0] is square.args[1]
        )
    return False


@dataclass(frozen=True)
class WeightUse:
    """A parameter used as the weight of a linear map, directly or through a computation that
    does not depend on the inputs (``argument``: the computed weight, as weight
    standardization computes it)."""

    name: str
    kind: str
    groups: int
    argument: fx.Node | None = None


def weight_uses(
    module: nn.Module, graph_module: fx.GraphModule | None, parameters: dict[str, nn.Parameter]
) -> list[WeightUse]:
    """The weights of the linear maps of ``module`` (traced as ``graph_module`` where it is),
    candidates once the shapes of computed weights are known (:func:`candidates`)."""
    by_id = {id(p): name for name, p in parameters.items()}
    uses = []
    if graph_module is None:
        for submodule in module.modules():
            kind = linear_kind(submodule)
            if kind is not None and id(submodule.weight) in by_id:
                groups = getattr(submodule, "groups", 1)
                uses.append(WeightUse(by_id[id(submodule.weight)], kind, groups))
        return uses
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            kind = linear_kind(module)
            if kind is not None and id(module.weight) in by_id:
                groups = getattr(module, "groups", 1)
                uses.append(WeightUse(by_id[id(module.weight)], kind, groups))
        elif node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
            kind = LINEAR_FUNCTIONS[node.target]
            groups = argument(node, 6, "groups", 1) if kind != "linear" else 1
            weight = argument(node, 1, "weight")
            sources = _sources(weight) if isinstance(weight, fx.Node) else []
            sources = [fetch(graph_module, s.target) for s in sources]
            sources = [p for p in sources if id(p) in by_id]
            if sources:  # the largest: the weight, not a gain multiplying it
                largest = max(sources, key=lambda p: p.numel())
                computed = None if weight.op == "get_attr" else weight
                uses.append(WeightUse(by_id[id(largest)], kind, groups, computed))
    return uses


def _sources(node: fx.Node, limit: int = 64) -> list[fx.Node]:
    """The ``get_attr`` nodes ``node`` is computed from; none where it depends on an input."""
    seen, stack, found = set(), [node], []
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder" or len(seen) > limit:
            return []
        if current.op == "get_attr":
            found.append(current)
        else:
            stack.extend(current.all_input_nodes)
    return found


def candidates(
    uses: list[WeightUse],
    parameters: dict[str, nn.Parameter],
    values: dict[fx.Node, object] | None,
    names: list[str],
) -> dict[str, Groupings]:
    """Candidate weight name → the groupings to try, finest first, in the order of ``names``;
    ``values``: the recorded values, which give the shapes of computed weights."""
    found: dict[str, Groupings] = {}
    for use in uses:
        if use.argument is not None:  # computed: a candidate where it has the weight's shape
            value = values[use.argument]
            if getattr(value, "shape", None) != parameters[use.name].shape:
                continue
        if use.kind == "conv_transpose" and use.groups != 1:
            found.setdefault(use.name, (None,))
        else:
            found.setdefault(use.name, ({"conv_transpose": 1}.get(use.kind, 0), None))
    return {name: found[name] for name in names if name in found}


def has_normalization(module: nn.Module, graph_module: fx.GraphModule | None) -> bool:
    """Whether anything in the copy may remove a scale: a normalization module or function, a
    variance (traced), a linear-map module with an ``eps`` (untraced)."""
    if any(isinstance(m, NORMALIZATION_MODULES) for m in module.modules()):
        return True
    if graph_module is None:
        return any(linear_kind(m) is not None and hasattr(m, "eps") for m in module.modules())
    return any(
        n.target in NORMALIZATION_EPS or n.target in _MOMENTS or n.target in _MOMENTS_WITH_MEAN
        for n in graph_module.graph.nodes
        if n.op in ("call_function", "call_method")
    )
