"""The probed copy of a model: float64, training mode, traced with :mod:`torch.fx` where possible.

:func:`prepare` deep-copies the model (the model itself is never touched), moves the copy to
float64 (or keeps the model's precision where float64 does not run), traces it, records every
intermediate value on the example inputs, sets the ``eps`` of every normalization to
:data:`NUMERIC_EPS` and lists the candidate weights: the ``weight`` of linear-map modules and the
``weight`` argument of ``F.linear``/``F.conv*``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from .flow import argument
from .rules import (
    LINEAR_FUNCTIONS,
    NORMALIZATION_EPS,
    NORMALIZATION_MODULES,
    linear_kind,
)

NUMERIC_EPS = 1e-30
"""The ``eps`` of every normalization in the probed copy."""
SEED = 20210107
"""The random seed of every forward pass of the probed copy (dropout draws the same masks)."""

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
Groupings = tuple[int | None, ...]


def check_model(caller: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: `model` must be a torch.nn.Module, got {type(model).__name__}")


def fetch(module: nn.Module, target: str):
    """The attribute of ``module`` at the dotted path ``target``."""
    for atom in target.split("."):
        module = getattr(module, atom)
    return module


@dataclass
class ProbeCopy:
    """A training-mode copy of a model to probe, traced where possible.

    ``graph_module`` and ``values`` (the value of every node on ``inputs``) are None where
    :mod:`torch.fx` cannot trace the model (``trace_error`` says why); ``precision_note`` says
    why the copy is not float64 where it is not. ``candidates`` maps each candidate weight, in
    the model's parameter order, to the groupings to try, finest first.
    """

    model_name: str
    names: list[str]
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    cuda_devices: list[int]
    graph_module: fx.GraphModule | None = None
    values: dict[fx.Node, object] | None = None
    trace_error: str | None = None
    precision_note: str | None = None
    candidates: dict[str, Groupings] = field(default_factory=dict)
    has_normalization: bool = False

    @property
    def forward(self) -> nn.Module:
        return self.graph_module if self.graph_module is not None else self.module

    @property
    def parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.module.named_parameters())

    def random_state(self):
        """A context that restores the global random state (CPU and the model's GPUs)."""
        return torch.random.fork_rng(devices=self.cuda_devices)


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


def prepare(model: nn.Module, example_inputs: Inputs) -> ProbeCopy:
    """The probed copy of ``model`` (see the module documentation)."""
    check_model("find_scale_invariant", model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple) or not all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        raise TypeError(
            "find_scale_invariant: `example_inputs` must be a Tensor or a tuple of Tensors, "
            f"got {type(example_inputs).__name__}"
        )
    devices = {p.device for p in model.parameters()}
    probe = ProbeCopy(
        model_name=type(model).__name__,
        names=[name for name, _ in model.named_parameters()],
        module=_copy(model).double().train(),
        inputs=tuple(t.double() if t.is_floating_point() else t for t in example_inputs),
        cuda_devices=sorted(d.index or 0 for d in devices if d.type == "cuda"),
    )
    with probe.random_state():
        try:
            probe.module(*probe.inputs)
        except Exception as error:
            # e.g. float32 tensors made inside forward: probe in the model's own precision
            probe.module, probe.inputs = _copy(model).train(), example_inputs
            probe.precision_note = f"{type(error).__name__}: {error}".splitlines()[0]
            try:
                probe.module(*probe.inputs)
            except Exception as own_error:  # the model's own error, not a float64 artefact
                raise RuntimeError(
                    f"find_scale_invariant: the forward pass of {probe.model_name} on "
                    f"`example_inputs` failed ({type(own_error).__name__}: {own_error})"
                ) from own_error
        _trace(probe)
    for module in probe.module.modules():
        if isinstance(module, NORMALIZATION_MODULES):
            module.eps = NUMERIC_EPS
    probe.candidates = _candidates(probe)
    probe.has_normalization = _has_normalization(probe)
    return probe


def _trace(probe: ProbeCopy) -> None:
    """Trace ``probe.module``, record its values and set the ``eps`` of functional norms."""
    try:
        graph_module = fx.symbolic_trace(probe.module)
        recorder = _Recorder(graph_module)
        torch.manual_seed(SEED)
        recorder.run(*probe.inputs)
    except Exception as error:
        probe.trace_error = f"{type(error).__name__}: {error}".splitlines()[0]
        warnings.warn(
            f"find_scale_invariant: torch.fx cannot trace {probe.model_name} "
            f"({probe.trace_error}); deciding from the numeric probe only",
            stacklevel=5,
        )
        return
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in NORMALIZATION_EPS:
            position = NORMALIZATION_EPS[node.target]
            if len(node.args) > position:
                node.args = (*node.args[:position], NUMERIC_EPS, *node.args[position + 1 :])
            else:
                node.kwargs = {**node.kwargs, "eps": NUMERIC_EPS}
    graph_module.recompile()
    probe.graph_module, probe.values = graph_module, recorder.values


def _candidates(probe: ProbeCopy) -> dict[str, Groupings]:
    """Candidate weight name → the groupings to try, finest first."""
    by_id = {id(p): name for name, p in probe.module.named_parameters()}
    found: dict[str, Groupings] = {}

    def add(weight, kind: str, groups: int) -> None:
        name = by_id.get(id(weight))
        if name is not None:
            channel = {"linear": 0, "conv": 0, "conv_transpose": 1}[kind]
            if kind == "conv_transpose" and groups != 1:
                found.setdefault(name, (None,))
            else:
                found.setdefault(name, (channel, None))

    if probe.graph_module is None:
        for module in probe.module.modules():
            kind = linear_kind(module)
            if kind is not None:
                add(module.weight, kind, getattr(module, "groups", 1))
    else:
        for node in probe.graph_module.graph.nodes:
            if node.op == "call_module":
                module = probe.graph_module.get_submodule(node.target)
                kind = linear_kind(module)
                if kind is not None:
                    add(module.weight, kind, getattr(module, "groups", 1))
            elif node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
                weight = argument(node, 1, "weight")
                if isinstance(weight, fx.Node) and weight.op == "get_attr":
                    kind = LINEAR_FUNCTIONS[node.target]
                    groups = argument(node, 6, "groups", 1) if kind != "linear" else 1
                    add(fetch(probe.graph_module, weight.target), kind, groups)
    return {name: found[name] for name in probe.names if name in found}


def _has_normalization(probe: ProbeCopy) -> bool:
    if any(isinstance(m, NORMALIZATION_MODULES) for m in probe.module.modules()):
        return True
    if probe.graph_module is None:
        return False
    return any(
        n.op == "call_function" and n.target in NORMALIZATION_EPS
        for n in probe.graph_module.graph.nodes
    )


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as error:
        raise TypeError(
            f"find_scale_invariant: cannot deep-copy {type(model).__name__} to probe it: {error}"
        ) from error
