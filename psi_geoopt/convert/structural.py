r"""The structural test: follow :math:`F \odot x + O` from one weight through the traced graph.

The groups of the weight get random factors :math:`c_k \in [1/2, 2]`; the graph is walked in
order and each node computed from the weight gets its state from the rule of its operation
(:data:`~.rules.RULES`). The grouping passes when no value that depends on the weight reaches
the model's output and at least one normalization removed the scale.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from .flow import Flow, Rejected, Removed, State, Walk, fetch
from .rules import linear_kind, rule_for, unsupported
from .tracing import SEED, ProbeCopy


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
    return Flow(factor.to(weight.device).reshape(shape).expand(weight.shape), weight=True)


class StructuralTest:
    """The structural test on one traced graph, for any weight and grouping.

    Only the nodes computed from the weight are visited, in the graph's order; the walk stops
    at the first value that no normalization can undo and that reaches the output.

    Parameters
    ----------
    probe : ProbeCopy
        the traced copy, with the value of every node recorded on the example inputs and the
        nodes that add an ``eps`` to a variance (ignored, as the ``eps`` of normalizations)
    """

    def __init__(self, probe: ProbeCopy):
        self.probe = probe
        self.graph_module = probe.graph_module
        nodes = list(self.graph_module.graph.nodes)
        self.order = {node: index for index, node in enumerate(nodes)}
        self.live = _reaching_output(nodes)

    def __call__(self, weight: torch.Tensor, dim: int | None) -> Verdict:
        """Follow ``weight``, grouped along ``dim`` (see the module documentation)."""
        walk = Walk(self.graph_module, self.probe.values, weight, weight_flow(weight, dim))
        owners = self.probe.owners(weight)
        walk.owners = {n for n in owners if n.op == "call_module"}
        walk.eps_additions = self.probe.eps_additions
        pending = [(self.order[n], n) for n in owners]
        heapq.heapify(pending)
        removed_by: list[str] = []
        while pending:
            _, node = heapq.heappop(pending)
            if node in walk.states:
                continue
            if node.op == "output":
                if any(isinstance(s, Flow) for s in tree_flatten(walk.states_of(node.args))[0]):
                    return Verdict("its scale reaches the model's output")
                continue
            state = _state(walk, node)
            if isinstance(state, Rejected) and node in self.live:
                return Verdict(state.reason)
            if isinstance(state, Removed):
                removed_by.append(state.where)
                state = None
            walk.states[node] = state
            if isinstance(state, (Flow, tuple)):
                for user in node.users:
                    heapq.heappush(pending, (self.order[user], user))
        if not removed_by:
            return Verdict("it reaches no normalization (no effect on the output)")
        return Verdict(None, tuple(dict.fromkeys(removed_by)))


def _reaching_output(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes from which a path leads to the output."""
    live = {n for n in nodes if n.op == "output"}
    for node in reversed(nodes):
        if node in live:
            live.update(node.all_input_nodes)
    return live


def _state(walk: Walk, node: fx.Node) -> State:
    """The state of ``node`` given those of its inputs."""
    if node.op == "get_attr":
        return walk.weight_flow if fetch(walk.graph_module, node.target) is walk.weight else None
    uses_weight = node in walk.owners
    inputs = [walk.states.get(n) for n in node.all_input_nodes]
    if not uses_weight and all(s is None for s in inputs):
        return None
    rejected = next((s for s in inputs if isinstance(s, Rejected)), None)
    if rejected is not None:
        return rejected
    if uses_weight and linear_kind(walk.module(node)) is None:
        name = type(walk.module(node)).__name__
        return Rejected(f"used inside {name} at {node.op} {node.name!r}")
    rule = rule_for(walk, node)
    if rule is None:
        return unsupported(walk, node)
    try:
        return rule(walk, node)
    except Exception as error:  # an argument this analysis cannot interpret
        return Rejected(f"cannot follow {node.op} {node.name!r} ({type(error).__name__})")
