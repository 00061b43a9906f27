r"""The structural test: follow :math:`F \odot x + O` from one weight through the traced graph.

The groups of the weight get random factors :math:`c_k \in [1/2, 2]`; the graph is walked in
order and each node computed from the weight gets its state from the rule of its operation
(:data:`~.rules.RULES`). The grouping passes when no value that depends on the weight reaches
the model's output and at least one normalization removed the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from .flow import Flow, Rejected, Removed, State, Walk
from .rules import linear_kind, rule_for, unsupported
from .tracing import SEED, fetch


@dataclass(frozen=True)
class Verdict:
    """The outcome of the structural test of one grouping of one weight.

    ``reason`` is None where the grouping passes; ``removed_by`` names the normalizations that
    remove the scale.
    """

    reason: str | None
    removed_by: tuple[str, ...] = ()


def weight_flow(weight: torch.Tensor, dim: int | None) -> Flow:
    """The factors of the probed weight: one random :math:`c_k \\in [1/2, 2]` per group."""
    generator = torch.Generator().manual_seed(SEED + 1)
    groups = 1 if dim is None else weight.shape[dim]
    shape = [1] * weight.dim()
    if dim is not None:
        shape[dim] = groups
    factor = 2.0 ** (2 * torch.rand(groups, generator=generator, dtype=torch.float64) - 1)
    return Flow(factor.to(weight.device).reshape(shape).expand(weight.shape))


def structural_test(
    graph_module: fx.GraphModule,
    values: dict[fx.Node, object],
    weight: torch.Tensor,
    dim: int | None,
) -> Verdict:
    """Follow ``weight``, grouped along ``dim``, through ``graph_module`` (see the module doc)."""
    walk = Walk(graph_module, values, weight, weight_flow(weight, dim))
    removed_by: list[str] = []
    for node in graph_module.graph.nodes:
        if node.op == "output":
            for leaf in tree_flatten(walk.states_of(node.args))[0]:
                if isinstance(leaf, Rejected):
                    return Verdict(leaf.reason)
                if isinstance(leaf, Flow):
                    return Verdict("its scale reaches the model's output")
            break
        state = _state(walk, node)
        if isinstance(state, Removed):
            removed_by.append(state.where)
            state = None
        walk.states[node] = state
    if not removed_by:
        return Verdict("it reaches no normalization (no effect on the output)")
    return Verdict(None, tuple(dict.fromkeys(removed_by)))


def _state(walk: Walk, node: fx.Node) -> State:
    """The state of ``node`` given those of its inputs."""
    if node.op == "get_attr":
        return walk.weight_flow if fetch(walk.graph_module, node.target) is walk.weight else None
    if node.op == "placeholder":
        return None
    module = walk.module(node) if node.op == "call_module" else None
    uses_weight = module is not None and any(p is walk.weight for p in module.parameters())
    inputs = [walk.states.get(n) for n in node.all_input_nodes]
    if not uses_weight and all(s is None for s in inputs):
        return None
    rejected = next((s for s in inputs if isinstance(s, Rejected)), None)
    if rejected is not None:
        return rejected
    if uses_weight and linear_kind(module) is None:
        return Rejected(f"used inside {type(module).__name__} at {node.op} {node.name!r}")
    rule = rule_for(walk, node)
    if rule is None:
        return unsupported(walk, node)
    try:
        return rule(walk, node)
    except Exception as error:  # an argument this analysis cannot interpret
        return Rejected(f"cannot follow {node.op} {node.name!r} ({type(error).__name__})")
