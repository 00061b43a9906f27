r"""The probed copy of a model: float64, training mode, generic values, traced where possible.

:func:`prepare` deep-copies the model (the model itself is never touched), moves the copy to
float64 (or keeps the model's precision where float64 does not run), traces it with
:mod:`torch.fx`, lists the candidate weights (the ``weight`` of linear-map modules and the
``weight`` argument of ``F.linear``/``F.conv*``), sets the ``eps`` of every normalization to
:data:`NUMERIC_EPS` and runs it once on the example inputs, recording every intermediate value.

Whether a weight is scale invariant must not depend on where in training the model is, but a
parameter may be special at initialization: a bias or a BatchNorm shift that is zero (a
per-channel bias of zero passes a LayerNorm over channels; any other does not), a BatchNorm
scale zero-initialized at the end of a residual branch, a layer scale of ``1e-6`` (the weights
before them seem to have no effect). So every trainable parameter of the copy that is not a
candidate gets generic values: :math:`\pm U(1/2, 3/2)`, with random signs where the parameter
has a negative entry, else positive. A candidate keeps its values (scaling them is what is
tested), unless it is zero, which would hide the effect of the weights before it: it then gets
:math:`N(0, 2/\text{fan-in})` values (and is still no point of the manifold). Frozen parameters
(``requires_grad=False``) keep their values: they stay as they are.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from .candidates import Groupings, candidates, has_normalization, is_eps_addition, weight_uses
from .flow import fetch
from .rules import NORMALIZATION_EPS, NORMALIZATION_MODULES, linear_kind

NUMERIC_EPS = 1e-30
"""The ``eps`` of every normalization in the probed copy."""
SEED = 20210107
"""The random seed of every forward pass of the probed copy (dropout draws the same masks)."""

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def check_model(caller: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: `model` must be a torch.nn.Module, got {type(model).__name__}")


def floating_leaves(output) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output, in order."""
    leaves, _ = tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


@dataclass
class ProbeCopy:
    """A training-mode copy of a model to probe, traced where possible.

    ``graph_module`` and ``values`` (the value of every node on ``inputs``) are None where
    :mod:`torch.fx` cannot trace the model (``trace_error`` says why); ``precision_note`` says
    why the copy is not float64 where it is not, ``values_note`` why it keeps the model's
    values where it does (the model fails with generic ones). ``candidates`` maps each
    candidate weight, in the model's parameter order, to the groupings to try, finest first;
    ``zero_candidates``
    holds the original values of the candidates that were zero. ``baseline`` is the output on
    ``inputs`` (its floating-point leaves), ``parameters`` those of ``module`` by name,
    ``random_states`` the random state before each node when it was recorded.
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
    values_note: str | None = None
    candidates: dict[str, Groupings] = field(default_factory=dict)
    eps_additions: set[fx.Node] = field(default_factory=set)
    zero_candidates: dict[str, torch.Tensor] = field(default_factory=dict)
    has_normalization: bool = False
    baseline: list[torch.Tensor] = field(default_factory=list)
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)
    random_states: dict[fx.Node, RandomState] = field(default_factory=dict)
    _owners: dict[int, list[fx.Node]] | None = None

    def owners(self, weight: torch.Tensor) -> list[fx.Node]:
        """The nodes of the traced graph that read ``weight``: ``get_attr`` nodes, and the
        ``call_module`` nodes whose module holds it."""
        if self._owners is None:
            self._owners = {}
            for node in self.graph_module.graph.nodes:
                if node.op == "get_attr":
                    target = fetch(self.graph_module, node.target)
                    self._owners.setdefault(id(target), []).append(node)
                elif node.op == "call_module":
                    for p in self.graph_module.get_submodule(node.target).parameters():
                        self._owners.setdefault(id(p), []).append(node)
        return self._owners.get(id(weight), [])

    @property
    def forward(self) -> nn.Module:
        return self.graph_module if self.graph_module is not None else self.module

    def original(self, name: str) -> torch.Tensor:
        """The value of parameter ``name`` in the model (before any generic values)."""
        return self.zero_candidates.get(name, self.parameters[name].detach())

    def random_state(self):
        """A context that restores the global random state (CPU and the model's GPUs)."""
        return torch.random.fork_rng(devices=self.cuda_devices)


@dataclass(frozen=True)
class RandomState:
    """The global random state (CPU and the given GPUs), to run a node again as it ran."""

    cpu: torch.Tensor
    cuda: tuple[tuple[int, torch.Tensor], ...] = ()

    @classmethod
    def get(cls, cuda_devices: list[int]) -> RandomState:
        cuda = tuple((d, torch.cuda.get_rng_state(d)) for d in cuda_devices)
        return cls(torch.get_rng_state(), cuda)

    def set(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


class _Recorder(fx.Interpreter):
    """Runs a traced module and keeps every intermediate value.

    Values are kept as they are, with their version counters; ``copies=True`` keeps copies
    instead, for graphs where some operation changes a value in place after it is recorded.
    """

    def __init__(self, module: fx.GraphModule, copies: bool, cuda_devices: list[int]):
        super().__init__(module, garbage_collect_values=False)
        self.values: dict[fx.Node, object] = {}
        self.random_states: dict[fx.Node, RandomState] = {}
        self.versions: list[tuple[torch.Tensor, int]] = []
        self.copies = copies
        self.cuda_devices = cuda_devices

    def run_node(self, n: fx.Node):
        self.random_states[n] = RandomState.get(self.cuda_devices)
        result = super().run_node(n)
        self.values[n] = tree_map(self._keep, result)
        return result

    def _keep(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        if self.copies:
            return value.detach().clone()
        self.versions.append((value, value._version))
        return value.detach()

    def changed_in_place(self) -> bool:
        return any(t._version != version for t, version in self.versions)


_IN_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def prepare(model: nn.Module, example_inputs: Inputs) -> ProbeCopy:
    """The probed copy of ``model`` (see the module documentation).

    Tried in turn until one runs: float64 and traced, float64 untraced (``torch.fx`` fails, or
    the traced copy does not run), the model's own precision traced, then untraced; where
    none runs, the model's own error is raised.
    """
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
    precision_note = None
    for double in (True, False):
        probe, error = _attempt(model, example_inputs, double, traced=True)
        if error is not None and probe.graph_module is not None:  # the traced copy fails
            trace_error = _describe(error)
            probe, error = _attempt(model, example_inputs, double, traced=False)
            probe.trace_error = trace_error
        if error is None:
            break
        precision_note = _describe(error)  # e.g. float32 tensors made inside forward
    if error is not None:  # the model's own error, not a float64 or tracing artefact
        raise RuntimeError(
            f"find_scale_invariant: the forward pass of {probe.model_name} on "
            f"`example_inputs` failed ({type(error).__name__}: {error})"
        ) from error
    if probe.graph_module is None:
        warnings.warn(
            f"find_scale_invariant: torch.fx cannot trace {probe.model_name} "
            f"({probe.trace_error}); deciding from the numeric probe only",
            stacklevel=5,
        )
    probe.precision_note = None if double else precision_note
    return probe


def _attempt(
    model: nn.Module, example_inputs: tuple, double: bool, traced: bool
) -> tuple[ProbeCopy, Exception | None]:
    """Build and run a copy; where it fails with generic values, once more with the model's."""
    for generic in (True, False):
        probe = _build(model, example_inputs, double, traced)
        uses = weight_uses(probe.module, probe.graph_module, probe.parameters)
        if generic:
            _set_generic_values(probe, {use.name for use in uses})
        _set_eps(probe)
        with probe.random_state():
            error = _first_run(probe)
        if generic and error is None and not all(bool(t.isfinite().all()) for t in probe.baseline):
            error = FloatingPointError("an output is not finite")
        if error is None or not generic:
            break
        generic_error = _describe(error)
    if error is None and not generic:
        probe.values_note = generic_error
    if error is None:
        probe.candidates = candidates(uses, probe.parameters, probe.values, probe.names)
        probe.has_normalization = has_normalization(probe.module, probe.graph_module)
    return probe, error


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _build(model: nn.Module, example_inputs: tuple, double: bool, traced: bool) -> ProbeCopy:
    """A copy of ``model`` in training mode, traced if ``traced``, ready to run."""
    devices = {p.device for p in model.parameters()}
    module = _copy(model, torch.float64 if double else None).train()
    _out_of_place(module)
    inputs = example_inputs
    if double:
        inputs = tuple(t.double() if t.is_floating_point() else t for t in example_inputs)
    probe = ProbeCopy(
        model_name=type(model).__name__,
        names=[name for name, _ in model.named_parameters()],
        module=module,
        inputs=inputs,
        cuda_devices=sorted(d.index or 0 for d in devices if d.type == "cuda"),
        parameters=dict(module.named_parameters()),
    )
    if traced:
        try:
            probe.graph_module = fx.symbolic_trace(module)
        except Exception as error:
            probe.trace_error = _describe(error)
        else:
            _graph_out_of_place(probe.graph_module)
    return probe


def _first_run(probe: ProbeCopy) -> Exception | None:
    """Run the copy once, seed fixed: record its values and output; the error where it fails."""
    torch.manual_seed(SEED)
    try:
        if probe.graph_module is None:
            with torch.no_grad():
                output = probe.module(*probe.inputs)
        else:
            recorder = _Recorder(probe.graph_module, False, probe.cuda_devices)
            with torch.no_grad():
                output = recorder.run(*probe.inputs)
            if recorder.changed_in_place():  # an in-place operation the copy still has
                recorder = _Recorder(probe.graph_module, True, probe.cuda_devices)
                torch.manual_seed(SEED)
                with torch.no_grad():
                    output = recorder.run(*probe.inputs)
            probe.values, probe.random_states = recorder.values, recorder.random_states
    except Exception as error:
        return error
    probe.baseline = floating_leaves(output)
    return None


def _set_generic_values(probe: ProbeCopy, weights: set[str]) -> None:
    """Generic values for the parameters that may be special now (see the module doc);
    ``weights``: the weights of linear maps, which keep their values unless they are zero."""
    generator = torch.Generator().manual_seed(SEED + 3)
    with torch.no_grad():
        for name, p in probe.module.named_parameters():
            if not p.requires_grad or not p.is_floating_point() or p.numel() == 0:
                continue
            if name in weights:
                if not p.any():
                    probe.zero_candidates[name] = p.detach().clone()
                    fan_in = p[0].numel() if p.dim() > 1 else 1
                    values = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                    p.copy_(values * (2.0 / fan_in) ** 0.5)
                continue
            values = 0.5 + torch.rand(p.shape, generator=generator, dtype=torch.float64)
            if bool((p < 0).any()):
                signs = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.float64)
                values = values * (2 * signs - 1)
            p.copy_(values)


def _out_of_place(module: nn.Module) -> None:
    """Modules of the copy compute out of place (``inplace=False``): recorded values stay."""
    for m in module.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False


def _graph_out_of_place(graph_module: fx.GraphModule) -> None:
    """``x += y`` and ``F.relu(x, inplace=True)`` in the traced graph become out of place."""
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in _IN_PLACE:
            node.target = _IN_PLACE[node.target]
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}


def _set_eps(probe: ProbeCopy) -> None:
    """Set to ``NUMERIC_EPS`` the ``eps`` of normalization modules, of linear-map modules that
    standardize their weight (a float ``eps`` attribute, as timm's ``StdConv2d``), of traced
    functional normalizations and the ``eps`` added to a variance in the traced graph."""
    for module in probe.module.modules():
        if isinstance(module, NORMALIZATION_MODULES) or (
            linear_kind(module) is not None and isinstance(getattr(module, "eps", None), float)
        ):
            module.eps = NUMERIC_EPS
    if probe.graph_module is None:
        return
    for node in probe.graph_module.graph.nodes:
        if node.op == "call_function" and node.target in NORMALIZATION_EPS:
            position = NORMALIZATION_EPS[node.target]
            if len(node.args) > position:
                node.args = (*node.args[:position], NUMERIC_EPS, *node.args[position + 1 :])
            else:
                node.kwargs = {**node.kwargs, "eps": NUMERIC_EPS}
        elif is_eps_addition(node):
            node.args = tuple(NUMERIC_EPS if isinstance(a, (int, float)) else a for a in node.args)
            probe.eps_additions.add(node)
    probe.graph_module.recompile()


def _copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A deep copy of ``model``; its floating-point parameters and buffers in ``dtype``."""
    memo: dict[int, object] = {}
    if dtype is not None:  # made in dtype directly: no copy in the model's own dtype first
        for p in model.parameters():
            if p.is_floating_point():
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for b in model.buffers():
            if b.is_floating_point():
                memo[id(b)] = b.detach().to(dtype, copy=True)
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:
        raise TypeError(
            f"find_scale_invariant: cannot deep-copy {type(model).__name__} to probe it: {error}"
        ) from error
