"""The probe: a float64 training-mode copy of a model, traced where possible, on which the
groupings of candidate weights are tested structurally and numerically."""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from ..manifold import PSIManifold
from .rules import (
    _ADD_METHODS,
    _ADDITIONS,
    _BATCH_NORM,
    _CONCATENATIONS,
    _DATA_MOVEMENT_FUNCTIONS,
    _DATA_MOVEMENT_METHODS,
    _DATA_MOVEMENT_MODULES,
    _HOMOGENEOUS_FUNCTIONS,
    _HOMOGENEOUS_METHODS,
    _HOMOGENEOUS_MODULES,
    _INSTANCE_NORM,
    _LINEAR_FUNCTIONS,
    _MUL_METHODS,
    _MULTIPLICATIONS,
    _NEGATIONS,
    _NORM_FUNCTIONS,
    _NORMALIZATIONS,
    _NORMALIZED,
    _POOL_FUNCTIONS,
    _POOL_MODULES,
    _SHAPE_QUERIES,
    _argument,
    _as_tuple,
    _Bad,
    _channel_factors,
    _constant_along,
    _factor,
    _Flow,
    _homogeneous,
    _linear_kind,
    _offset_or_zeros,
    _removed,
    _shift,
    _states_of,
)

_NUMERIC_EPS = 1e-30
_SCALE_DECADES = 2.0
_INVARIANCE_RTOL = 1e-7
_EFFECT_RTOL = 1e-4
_LOW_INVARIANCE_RTOL = 1e-4  # where float64 does not run
_LOW_EFFECT_RTOL = 1e-2
_ROTATION = 0.3
_SEED = 20210107

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def _check_model(caller: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: `model` must be a torch.nn.Module, got {type(model).__name__}")


@dataclass(frozen=True)
class _Decision:
    invariant: bool
    dim: int | None
    reason: str


class _Recorder(fx.Interpreter):
    """Runs a traced module and keeps a copy of every intermediate value."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module, garbage_collect_values=False)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        self.values[n] = tree_map(
            lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, result
        )
        return result


class _Probe:
    """A float64 training-mode copy of a model, traced where possible, to test groupings on."""

    def __init__(self, model: nn.Module, example_inputs: Inputs):
        _check_model("find_scale_invariant", model)
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if not isinstance(example_inputs, tuple) or not all(
            isinstance(t, torch.Tensor) for t in example_inputs
        ):
            raise TypeError(
                "find_scale_invariant: `example_inputs` must be a Tensor or a tuple of Tensors, "
                f"got {type(example_inputs).__name__}"
            )
        self.model_name = type(model).__name__
        self.names = [name for name, _ in model.named_parameters()]
        devices = {p.device for p in model.parameters()}
        self.cuda_devices = sorted(d.index or 0 for d in devices if d.type == "cuda")
        self.trace_error: str | None = None
        self.precision_note: str | None = None
        self.module = _copy(model).double().train()
        self.inputs = tuple(t.double() if t.is_floating_point() else t for t in example_inputs)
        self.invariance_rtol, self.effect_rtol = _INVARIANCE_RTOL, _EFFECT_RTOL
        with self._random_state():
            try:
                self.module(*self.inputs)
            except Exception as error:
                # e.g. float32 tensors made inside forward: probe in the model's own precision
                self.module, self.inputs = _copy(model).train(), example_inputs
                self.invariance_rtol, self.effect_rtol = _LOW_INVARIANCE_RTOL, _LOW_EFFECT_RTOL
                self.precision_note = f"{type(error).__name__}: {error}".splitlines()[0]
                try:
                    self.module(*self.inputs)
                except Exception as own_error:  # the model's own error, not a float64 artefact
                    raise RuntimeError(
                        f"find_scale_invariant: the forward pass of {self.model_name} on "
                        f"`example_inputs` failed ({type(own_error).__name__}: {own_error})"
                    ) from own_error
            self.graph_module = self._trace()
        self.parameters = dict(self.module.named_parameters())
        for module in self.module.modules():
            if isinstance(module, _NORMALIZATIONS):
                module.eps = _NUMERIC_EPS
        self.forward = self.graph_module if self.graph_module is not None else self.module
        self.candidates = self._candidates()
        self.has_normalization = self._has_normalization()
        self._baseline: list[torch.Tensor] | None = None

    # -- setup

    def _random_state(self):
        return torch.random.fork_rng(devices=self.cuda_devices)

    def _trace(self) -> fx.GraphModule | None:
        try:
            graph_module = fx.symbolic_trace(self.module)
            recorder = _Recorder(graph_module)
            torch.manual_seed(_SEED)
            recorder.run(*self.inputs)
        except Exception as error:
            self.trace_error = f"{type(error).__name__}: {error}".splitlines()[0]
            warnings.warn(
                f"find_scale_invariant: torch.fx cannot trace {self.model_name} "
                f"({self.trace_error}); deciding from the numeric probe only",
                stacklevel=4,
            )
            return None
        self.values = recorder.values
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and node.target in _NORM_FUNCTIONS:
                position = _NORM_FUNCTIONS[node.target]
                if len(node.args) > position:
                    node.args = (*node.args[:position], _NUMERIC_EPS, *node.args[position + 1 :])
                else:
                    node.kwargs = {**node.kwargs, "eps": _NUMERIC_EPS}
        graph_module.recompile()
        return graph_module

    def _candidates(self) -> dict[str, tuple[int | None, ...]]:
        """Candidate weight name → the groupings to try, finest first."""
        by_id = {id(p): name for name, p in self.parameters.items()}
        found: dict[str, tuple[int | None, ...]] = {}

        def add(weight, kind: str, groups: int) -> None:
            name = by_id.get(id(weight))
            if name is not None:
                channel = {"linear": 0, "conv": 0, "conv_transpose": 1}[kind]
                if kind == "conv_transpose" and groups != 1:
                    found.setdefault(name, (None,))
                else:
                    found.setdefault(name, (channel, None))

        if self.graph_module is None:
            for module in self.module.modules():
                kind = _linear_kind(module)
                if kind is not None:
                    add(module.weight, kind, getattr(module, "groups", 1))
        else:
            for node in self.graph_module.graph.nodes:
                if node.op == "call_module":
                    module = self.graph_module.get_submodule(node.target)
                    kind = _linear_kind(module)
                    if kind is not None:
                        add(module.weight, kind, getattr(module, "groups", 1))
                elif node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
                    weight = _argument(node, 1, "weight")
                    if isinstance(weight, fx.Node) and weight.op == "get_attr":
                        kind = _LINEAR_FUNCTIONS[node.target]
                        groups = _argument(node, 6, "groups", 1) if kind != "linear" else 1
                        add(_fetch(self.graph_module, weight.target), kind, groups)
        return {name: found[name] for name in self.names if name in found}

    def _has_normalization(self) -> bool:
        if any(isinstance(m, _NORMALIZATIONS) for m in self.module.modules()):
            return True
        if self.graph_module is None:
            return False
        return any(
            n.op == "call_function" and n.target in _NORM_FUNCTIONS
            for n in self.graph_module.graph.nodes
        )

    # -- decisions

    def decide_all(self) -> dict[str, _Decision]:
        """Decide every candidate; one joint rescaling replaces the per-weight ones if it holds."""
        if not self.has_normalization:
            return {}
        if self.graph_module is None:
            return {name: self.decide(name) for name in self.candidates}
        decisions, accepted = {}, {}
        with self._random_state():
            for name, dims in self.candidates.items():
                reasons = []
                for dim in dims:
                    reason = self._structural(name, dim) or self._not_a_point(name, dim)
                    if reason is None:
                        accepted[name] = dim
                        break
                    reasons.append(f"dim={dim}: {reason}")
                decisions[name] = _Decision(False, None, "; ".join(reasons))
            jointly = self._rescaled_change(accepted) <= self.invariance_rtol
            for name, dim in accepted.items():
                if not jointly:
                    decisions[name] = self.decide(name)
                elif (reason := self._no_effect(name, dim)) is not None:
                    decisions[name] = _Decision(False, None, f"dim={dim}: {reason}")
                else:
                    decisions[name] = _Decision(True, dim, "invariant")
        return decisions

    def decide(self, name: str, dims: tuple[int | None, ...] | None = None) -> _Decision:
        """Accept the first grouping of ``dims`` (default: the candidate's) that holds."""
        if name not in self.candidates:
            return _Decision(
                False,
                None,
                "not the weight of a Linear/Conv/ConvTranspose module or of F.linear/F.conv*",
            )
        if not self.has_normalization:
            return _Decision(False, None, "the model has no normalization layer")
        reasons = []
        for dim in self.candidates[name] if dims is None else dims:
            with self._random_state():
                reason = self._structural(name, dim) if self.graph_module is not None else None
                if reason is None:
                    reason = self._numeric(name, dim)
            if reason is None:
                return _Decision(True, dim, "invariant")
            reasons.append(f"dim={dim}: {reason}")
        return _Decision(False, None, "; ".join(reasons))

    def summary(self, decisions: dict[str, _Decision]) -> str:
        lines = [f"find_scale_invariant({self.model_name}):"]
        if self.precision_note is not None:
            lines.append(f"  float64 forward failed ({self.precision_note}): own precision")
        if self.trace_error is not None:
            lines.append(f"  not traceable ({self.trace_error}): numeric probe only")
        if not self.has_normalization:
            lines.append(
                "  no normalization layer (BatchNorm, SyncBatchNorm, InstanceNorm, GroupNorm, "
                "LayerNorm, RMSNorm or their functional forms): no parameter is scale invariant"
            )
        for name, decision in decisions.items():
            if decision.invariant:
                lines.append(f"  {name}: PSI, dim={decision.dim}")
            else:
                lines.append(f"  {name}: not PSI ({decision.reason})")
        others = len(self.names) - len(decisions)
        if self.has_normalization:
            lines.append(f"  ({others} other parameters are not weights of linear maps)")
        return "\n".join(lines)

    # -- numeric test

    def _outputs(self) -> list[torch.Tensor]:
        torch.manual_seed(_SEED)
        with torch.no_grad():
            leaves, _ = tree_flatten(self.forward(*self.inputs))
        return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]

    def _largest_change(self, reference: list[torch.Tensor]) -> float:
        """max over outputs of ``max |y - y_ref| / max |y_ref|`` (inf for non-finite)."""
        change = 0.0
        for new, old in zip(self._outputs(), reference, strict=True):
            scale = old.abs().max().item() if old.numel() else 0.0
            difference = (new - old).abs().max().item() if old.numel() else 0.0
            if difference != difference or scale != scale:
                return float("inf")
            change = max(change, difference / max(scale, torch.finfo(torch.float64).tiny))
        return change

    def _numeric(self, name: str, dim: int | None) -> str | None:
        """The reason ``name`` grouped along ``dim`` fails the numeric test, or None."""
        reason = self._not_a_point(name, dim)
        if reason is None:
            change = self._rescaled_change({name: dim})
            if change > self.invariance_rtol:
                reason = f"rescaling its groups changes the output (relative change {change:.2g})"
        return reason if reason is not None else self._no_effect(name, dim)

    def _not_a_point(self, name: str, dim: int | None) -> str | None:
        try:
            PSIManifold(dim).assert_check_point(self.parameters[name].detach())
        except ValueError as error:
            return f"not a point of the PSI manifold ({error})"
        return None

    def _rescaled_change(self, groupings: dict[str, int | None]) -> float:
        """Relative output change when every group of ``groupings`` gets a random factor."""
        if self._baseline is None:
            self._baseline = self._outputs()
        generator = torch.Generator().manual_seed(_SEED)
        originals = {name: self.parameters[name].detach().clone() for name in groupings}
        try:
            with torch.no_grad():
                for name, dim in groupings.items():
                    weight = self.parameters[name]
                    shape = [1] * weight.dim()
                    if dim is not None:
                        shape[dim] = weight.shape[dim]
                    exponents = torch.rand(shape, generator=generator, dtype=torch.float64)
                    weight.mul_((10.0 ** (_SCALE_DECADES * (2 * exponents - 1))).to(weight))
            return self._largest_change(self._baseline)
        finally:
            with torch.no_grad():
                for name, original in originals.items():
                    self.parameters[name].copy_(original)

    def _no_effect(self, name: str, dim: int | None) -> str | None:
        """A reason if rotating every group by ``_ROTATION`` leaves the output as it was."""
        if self._baseline is None:
            self._baseline = self._outputs()
        weight = self.parameters[name]
        manifold = PSIManifold(dim)
        original = weight.detach().clone()
        generator = torch.Generator().manual_seed(_SEED + 2)
        direction = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        direction = manifold.proju(original, direction.to(weight))
        angle = manifold.norm(original, direction, keepdim=True)
        try:
            with torch.no_grad():
                weight.copy_(manifold.expmap(original, direction * (_ROTATION / angle)))
            change = self._largest_change(self._baseline)
        finally:
            with torch.no_grad():
                weight.copy_(original)
        if not change > self.effect_rtol:
            return f"it has no effect on the output (relative change {change:.2g})"
        return None

    # -- structural test

    def _structural(self, name: str, dim: int | None) -> str | None:
        weight = self.parameters[name]
        generator = torch.Generator().manual_seed(_SEED + 1)
        groups = 1 if dim is None else weight.shape[dim]
        shape = [1] * weight.dim()
        if dim is not None:
            shape[dim] = groups
        factor = 2.0 ** (2 * torch.rand(groups, generator=generator, dtype=torch.float64) - 1)
        weight_flow = _Flow(factor.to(weight.device).reshape(shape).expand(weight.shape))
        states: dict[fx.Node, object] = {}
        normalized = False
        for node in self.graph_module.graph.nodes:
            if node.op == "output":
                leaves, _ = tree_flatten(_states_of(node.args, states))
                for leaf in leaves:
                    if isinstance(leaf, _Bad):
                        return leaf.reason
                    if isinstance(leaf, _Flow):
                        return "its scale reaches the model's output"
                break
            if node.op == "get_attr":
                value = _fetch(self.graph_module, node.target)
                states[node] = weight_flow if value is weight else None
                continue
            if node.op == "placeholder":
                states[node] = None
                continue
            uses_weight = node.op == "call_module" and any(
                p is weight for p in self.graph_module.get_submodule(node.target).parameters()
            )
            inputs = [states.get(n) for n in node.all_input_nodes]
            if not uses_weight and all(s is None for s in inputs):
                states[node] = None
                continue
            bad = next((s for s in inputs if isinstance(s, _Bad)), None)
            if bad is not None:
                states[node] = bad
                continue
            try:
                state = self._transfer(node, states, weight, weight_flow)
            except Exception as error:  # an argument this analysis cannot interpret
                state = _Bad(f"cannot follow {node.op} {node.name!r} ({type(error).__name__})")
            if state is _NORMALIZED:
                normalized = True
                state = None
            states[node] = state
        if not normalized:
            return "it reaches no normalization (no effect on the output)"
        return None

    def _transfer(self, node: fx.Node, states, weight, weight_flow):
        """The state of ``node`` given those of its inputs (at least one depends on the weight)."""
        where = f"at {node.op} {node.name!r}"
        if node.op == "call_module":
            module = self.graph_module.get_submodule(node.target)
            kind = _linear_kind(module)
            if kind is not None:
                if any(p is weight for p in module.parameters() if p is not module.weight):
                    return _Bad(f"used as a bias {where}")
                w_state = weight_flow if module.weight is weight else None
                groups = getattr(module, "groups", 1)
                return self._linear(node, states, kind, w_state, module.bias is not None, groups)
            if any(p is weight for p in module.parameters()):
                return _Bad(f"used inside {type(module).__name__} {where}")
            if isinstance(module, _NORMALIZATIONS):
                return self._normalization(node, states, module, None)
            if isinstance(module, _HOMOGENEOUS_MODULES):
                return _homogeneous(states[node.args[0]], where)
            if isinstance(module, _POOL_MODULES):
                d = int(type(module).__name__[-2])
                padded_average = isinstance(
                    module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
                ) and any(p != 0 for p in _as_tuple(module.padding))
                return self._pool(node, states, d, padded_average)
            if isinstance(module, _DATA_MOVEMENT_MODULES):
                return self._move(node, states)
            return _Bad(f"{type(module).__name__} {where} is not positively homogeneous")
        target = node.target
        if (node.op, target) in _SHAPE_QUERIES:
            return None
        if node.op == "call_function":
            if target in _LINEAR_FUNCTIONS:
                kind = _LINEAR_FUNCTIONS[target]
                w_node = _argument(node, 1, "weight")
                b_node = _argument(node, 2, "bias")
                if isinstance(b_node, fx.Node) and states.get(b_node) is not None:
                    return _Bad(f"used as a bias {where}")
                w_state = states.get(w_node) if isinstance(w_node, fx.Node) else None
                groups = _argument(node, 6, "groups", 1) if kind != "linear" else 1
                return self._linear(node, states, kind, w_state, b_node is not None, groups)
            if target in _NORM_FUNCTIONS:
                return self._normalization(node, states, None, target)
            if target in _HOMOGENEOUS_FUNCTIONS:
                return _homogeneous(states[node.args[0]], where)
            if target in _POOL_FUNCTIONS:
                padded_average = "avg" in target.__name__ and "adaptive" not in target.__name__
                return self._pool(node, states, _POOL_FUNCTIONS[target], padded_average)
            if target in _DATA_MOVEMENT_FUNCTIONS:
                return self._move(node, states)
            if target in _CONCATENATIONS:
                return self._concatenate(node, states)
            if target in _ADDITIONS:
                return self._add(node, states)
            if target in _MULTIPLICATIONS:
                return self._multiply(node, states, divide=target in (operator.truediv, torch.div))
            if target in _NEGATIONS:
                return self._negate(states[node.args[0]])
            return _Bad(f"{getattr(target, '__name__', target)} {where} is not supported")
        if node.op == "call_method":
            if target in _HOMOGENEOUS_METHODS:
                return _homogeneous(states[node.args[0]], where)
            if target in _DATA_MOVEMENT_METHODS:
                return self._move(node, states)
            if target in _ADD_METHODS:
                return self._add(node, states)
            if target in _MUL_METHODS:
                return self._multiply(node, states, divide=target.startswith("div"))
            if target == "neg":
                return self._negate(states[node.args[0]])
            if target == "mean":
                return self._mean(node, states)
            return _Bad(f"method {target!r} {where} is not supported")
        return _Bad(f"{where} is not supported")

    # -- transfer rules

    def _substitute(
        self,
        node: fx.Node,
        states,
        pick: Callable[[_Flow, fx.Node], torch.Tensor],
        first: torch.Tensor | None = None,
    ):
        """``node``'s operation applied with ``pick(flow, input)`` in place of every flow input.

        ``first``, where given, replaces the first argument whatever its state.
        """

        def replace(arg):
            state, value = states.get(arg), self.values[arg]
            if isinstance(state, tuple):  # the pieces of chunk/split
                return type(value)(
                    pick(s, arg) if isinstance(s, _Flow) else v
                    for s, v in zip(state, value, strict=True)
                )
            return pick(state, arg) if isinstance(state, _Flow) else value

        args = fx.node.map_arg(node.args, replace)
        kwargs = fx.node.map_arg(node.kwargs, replace)
        if first is not None:
            args = (first, *args[1:])
        if node.op == "call_module":
            return self.graph_module.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def _move(self, node: fx.Node, states):
        """Data movement: the same operation applied to F and O."""
        flows = [s for s in tree_flatten(_states_of(node.args, states))[0] if isinstance(s, _Flow)]
        factor = self._substitute(node, states, _factor)
        if any(s.offset is not None for s in flows):
            offset = self._substitute(node, states, _shift)
        else:
            offset = None
        if isinstance(factor, (tuple, list)):
            offsets = offset if offset is not None else [None] * len(factor)
            return tuple(_Flow(f, o) for f, o in zip(factor, offsets, strict=True))
        return _Flow(factor, offset)

    def _concatenate(self, node: fx.Node, states):
        def pieces(pick, fill):
            return [
                pick(states[t]) if isinstance(states.get(t), _Flow) else fill(self.values[t])
                for t in node.args[0]
            ]

        rest = node.args[1:]
        kwargs = fx.node.map_arg(node.kwargs, lambda a: self.values[a])
        factor = node.target(pieces(lambda s: s.factor, torch.ones_like), *rest, **kwargs)
        offset = None
        if any(
            isinstance(states.get(t), _Flow) and states[t].offset is not None for t in node.args[0]
        ):
            offset = node.target(pieces(_offset_or_zeros, torch.zeros_like), *rest, **kwargs)
        return _Flow(factor, offset)

    def _linear(self, node, states, kind: str, w_state, has_bias: bool, groups: int):
        r"""A linear map :math:`y = W * x + b`; the flow may enter through ``x`` and/or ``W``."""
        where = f"at {node.op} {node.name!r}"
        out = self.values[node]
        x_state = states.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if w_state is not None and (not isinstance(w_state, _Flow) or w_state.offset is not None):
            return _Bad(f"the weight is transformed before use {where}")
        factor = torch.ones((1,) * out.dim(), dtype=out.dtype, device=out.device)
        shifted = isinstance(x_state, _Flow) and x_state.offset is not None
        if isinstance(x_state, _Flow):
            n_contracted = 1 if kind == "linear" else self._weight_rank(node, w_state) - 1
            rank = x_state.factor.dim()
            contracted = list(range(rank - n_contracted, rank))
            if not _constant_along(x_state.factor, contracted):
                return _Bad(f"channels with different factors are mixed {where}")
            factor = x_state.factor.amax(dim=contracted, keepdim=True)
            if w_state is not None and shifted:
                return _Bad(f"a shifted input meets the scaled weight {where}")
        if w_state is not None:
            per_channel = _channel_factors(w_state.factor, kind, groups)
            if per_channel is None:
                return _Bad(f"the weight's groups are not output channels {where}")
            axis = out.dim() - 1 if kind == "linear" else out.dim() - w_state.factor.dim() + 1
            shape = [1] * out.dim()
            shape[axis] = per_channel.numel()
            factor = factor * per_channel.reshape(shape)
        offset = None
        if has_bias or shifted:
            # W * O + b, with the weight's recorded value (the offset does not scale with it)
            source = x_state if shifted else _Flow(torch.zeros_like(self.values[node.args[0]]))
            offset = self._substitute(
                node, states, lambda _, n: self.values[n], first=_offset_or_zeros(source)
            )
        return _Flow(factor.expand(out.shape), offset)

    def _weight_rank(self, node: fx.Node, w_state) -> int:
        if w_state is not None:
            return w_state.factor.dim()
        if node.op == "call_module":
            return self.graph_module.get_submodule(node.target).weight.dim()
        return self.values[node.args[1]].dim()

    def _normalization(self, node, states, module, function):
        where = f"at {node.op} {node.name!r}"
        flow = states.get(node.args[0])
        parameters = [n for n in node.all_input_nodes if n is not node.args[0]]
        if not isinstance(flow, _Flow) or any(states.get(n) is not None for n in parameters):
            return _Bad(f"used in the parameters of a normalization {where}")
        rank = flow.factor.dim()
        removes_offset = True
        if module is not None:
            if isinstance(module, _BATCH_NORM):
                batch_statistics = module.training or module.running_mean is None
                axes = [a for a in range(rank) if a != 1]
            elif isinstance(module, _INSTANCE_NORM):
                batch_statistics = module.training or not module.track_running_stats
                d = int(type(module).__name__[-2])
                axes = list(range(rank - d, rank))
            elif isinstance(module, nn.GroupNorm):
                return self._group_norm(flow, module.num_groups, where)
            else:
                batch_statistics = True
                axes = list(range(rank - len(module.normalized_shape), rank))
                removes_offset = not isinstance(module, nn.RMSNorm)
        else:
            name = function.__name__
            if name == "batch_norm":
                batch_statistics = bool(_argument(node, 5, "training", False)) or (
                    _argument(node, 1, "running_mean") is None
                )
                axes = [a for a in range(rank) if a != 1]
            elif name == "instance_norm":
                batch_statistics = bool(_argument(node, 5, "use_input_stats", True))
                axes = list(range(2, rank))
            elif name == "group_norm":
                return self._group_norm(flow, _argument(node, 1, "num_groups"), where)
            else:
                batch_statistics = True
                normalized_shape = _argument(node, 1, "normalized_shape")
                count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
                axes = list(range(rank - count, rank))
                removes_offset = name != "rms_norm"
        if not batch_statistics:
            return _Bad(f"a normalization with running statistics {where} keeps the scale")
        return _removed(flow, axes, removes_offset, where)

    def _group_norm(self, flow: _Flow, num_groups: int, where: str):
        def grouped(t):
            return t.reshape(t.shape[0], num_groups, -1)

        offset = None if flow.offset is None else grouped(flow.offset)
        return _removed(_Flow(grouped(flow.factor), offset), [2], True, where)

    def _pool(self, node, states, d: int, padded_average: bool):
        where = f"at {node.op} {node.name!r}"
        flow = states[node.args[0]]
        if not isinstance(self.values[node], torch.Tensor):
            return _Bad(f"pooling with indices {where}")
        axes = list(range(flow.factor.dim() - d, flow.factor.dim()))
        out_shape = self.values[node].shape
        if not _constant_along(flow.factor, axes):
            return _Bad(f"the factor varies inside the pooling windows {where}")
        factor = flow.factor.amax(dim=axes, keepdim=True).expand(out_shape)
        offset = None
        if flow.offset is not None:
            if padded_average:
                return _Bad(f"a shift is averaged with zero padding {where}")
            if not _constant_along(flow.offset, axes):
                return _Bad(f"the shift varies inside the pooling windows {where}")
            offset = flow.offset.amax(dim=axes, keepdim=True).expand(out_shape)
        return _Flow(factor, offset)

    def _mean(self, node, states):
        where = f"at {node.op} {node.name!r}"
        flow = states[node.args[0]]
        dims = _argument(node, 1, "dim")
        dims = list(range(flow.factor.dim())) if dims is None else list(_as_tuple(dims))
        if not _constant_along(flow.factor, dims):
            return _Bad(f"channels with different factors are averaged {where}")
        factor = self._substitute(node, states, _factor)
        offset = None if flow.offset is None else self._substitute(node, states, _shift)
        return _Flow(factor, offset)

    def _add(self, node, states):
        where = f"at {node.op} {node.name!r}"
        first, second = (_states_of(a, states) for a in node.args[:2])
        flows = [s for s in (first, second) if isinstance(s, _Flow)]
        if len(node.args) > 2 or node.kwargs:
            return _Bad(f"add with extra arguments {where}")
        out_shape = self.values[node].shape
        if len(flows) == 2 and not torch.allclose(
            first.factor.expand(out_shape), second.factor.expand(out_shape), rtol=1e-12, atol=0
        ):
            return _Bad(f"added to a value scaled differently {where}")
        factor = flows[0].factor.expand(out_shape)
        offset = self._substitute(node, states, _shift)
        return _Flow(factor, offset)

    def _multiply(self, node, states, divide: bool):
        where = f"at {node.op} {node.name!r}"
        first, second = (_states_of(a, states) for a in node.args[:2])
        out_shape = self.values[node].shape
        if isinstance(second, _Flow) and divide:
            return _Bad(f"divided by a value computed from the weight {where}")
        if isinstance(first, _Flow) and isinstance(second, _Flow):
            if first.offset is not None or second.offset is not None:
                return _Bad(f"product of shifted values {where}")
            return _Flow((first.factor * second.factor).expand(out_shape))
        flow = first if isinstance(first, _Flow) else second
        offset = None
        if flow.offset is not None:
            offset = self._substitute(node, states, _shift)
        return _Flow(flow.factor.expand(out_shape), offset)

    @staticmethod
    def _negate(flow: _Flow):
        return _Flow(flow.factor, None if flow.offset is None else -flow.offset)


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as error:
        raise TypeError(
            f"find_scale_invariant: cannot deep-copy {type(model).__name__} to probe it: {error}"
        ) from error


def _fetch(module: nn.Module, target: str):
    for atom in target.split("."):
        module = getattr(module, atom)
    return module
