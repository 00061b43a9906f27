r"""Find the positively scale-invariant (PSI) weights of a model and put them on the PSI manifold.

A parameter :math:`W`, split into groups along an axis ``dim`` as in
:class:`~psi_geoopt.PSIManifold`, is *positively scale invariant* when the training-mode output
of the model does not change if every group :math:`w_k` is multiplied by its own
:math:`c_k > 0`: :math:`f(\ldots, c \odot W, \ldots) = f(\ldots, W, \ldots)`. The loss then is
PSI too, whatever it is computed from the output.

Decision rule
-------------
Only the weights of linear maps are candidates: the ``weight`` of ``Linear``, ``Conv1d/2d/3d``
and ``ConvTranspose1d/2d/3d`` modules and the ``weight`` argument of ``F.linear``,
``F.conv*d`` and ``F.conv_transpose*d``. For each candidate two groupings are tried, the
finest first: one group per output channel (``dim=0`` for ``Linear``/``Conv`` weights
``(out, in, ...)``, ``dim=1`` for ``ConvTranspose`` weights ``(in, out/groups, ...)`` when
``groups == 1``), then the whole tensor (``dim=None``). A grouping is accepted when

1. **structurally** (the model is traced with :mod:`torch.fx` on a float64 copy in training
   mode): every value computed from the weight can be written :math:`F \odot x + O`, where the
   positive factor :math:`F` depends on the :math:`c_k` and the offset :math:`O` does not, and
   every such value reaches the output only through a normalization that removes both, i.e.
   :math:`F` and :math:`O` are constant over each normalized slice. :math:`F` and :math:`O`
   are followed as tensors with the shapes of the recorded activations, for one random draw of
   the :math:`c_k`:

   - the linear map itself gives :math:`F = c` on its output channel axis and :math:`O` = its
     bias (a later linear map keeps :math:`F` if :math:`F` is constant along the axes it
     contracts, and maps :math:`O` with its own weight and bias);
   - ReLU, LeakyReLU, PReLU and dropout keep :math:`F` (positive homogeneity) and need
     :math:`O = 0`; max/avg/adaptive pooling needs :math:`F` and :math:`O` constant inside its
     windows (and no :math:`O` through a zero-padded average), ``mean`` needs :math:`F`
     constant along the averaged axes; flatten/view/reshape/permute/transpose/squeeze/indexing,
     ``chunk``/``split`` and ``cat``/``stack`` (other inputs pass by with :math:`F = 1`) move
     :math:`F` and :math:`O` with the data, so channels keep their order; shape queries
     (``size``, ``shape``) are not scaled;
   - adding a tensor not computed from the weight adds it to :math:`O`; adding two values
     computed from the weight needs the same :math:`F`; multiplying by a tensor not computed
     from the weight keeps :math:`F` and multiplies :math:`O`;
   - BatchNorm1d/2d/3d and SyncBatchNorm with batch statistics normalize over all axes but
     the channel, InstanceNorm over the spatial axes, LayerNorm over its ``normalized_shape``,
     GroupNorm over each group of channels (so per-channel factors survive it unless a group
     holds one channel), RMSNorm like LayerNorm but only when :math:`O = 0`; the functional
     forms (``F.batch_norm`` with ``training=True``, ``F.layer_norm``, ...) likewise;
   - anything else reached by :math:`F` (sigmoid, an unknown module, a shortcut added to it,
     the model's output) means "not invariant". A weight that reaches no output at all is not
     invariant either (it has no effect).

2. **numerically**, on the same float64 copy with the ``eps`` of every normalization set to
   ``1e-30`` (in modules and, when traced, in functional calls), the random seed fixed for
   every forward pass (dropout draws the same masks) and in training mode: multiplying the
   groups by factors :math:`10^{U(-2, 2)}` changes no output by more than :math:`10^{-7}`
   times its largest entry, and rotating every group by 0.3 rad away from itself changes some
   output by more than :math:`10^{-4}` times its largest entry (the parameter has an effect;
   a zero group fails here too, since it is no point of the manifold). To save forward passes,
   :func:`find_scale_invariant` first rescales all the structurally accepted weights at once
   (each group by its own factor) and tests them one by one only if that changes the output;
   the effect test is always one weight at a time.

When :mod:`torch.fx` cannot trace the model (data-dependent control flow), only the numeric
test decides, for the ``weight`` of the linear-map modules listed above, and a warning says so
(the ``eps`` of functional normalizations then stays, which can only turn a "yes" into a "no").
When the model does not run in float64 (e.g. float32 tensors created inside ``forward``), the
copy keeps the model's own precision and the thresholds become :math:`10^{-4}` and
:math:`10^{-2}`.
Probing never touches the model: it works on a deep copy, inside
:func:`torch.random.fork_rng`, so parameters, buffers (running statistics,
``num_batches_tracked``), training flags and the global random state are left as they were.
"""

from __future__ import annotations

import copy
import difflib
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import geoopt
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from .manifold import PSIManifold

__all__ = ["find_scale_invariant", "param_groups", "to_psi"]

_NUMERIC_EPS = 1e-30
_SCALE_DECADES = 2.0
_INVARIANCE_RTOL = 1e-7
_EFFECT_RTOL = 1e-4
_LOW_INVARIANCE_RTOL = 1e-4  # where float64 does not run
_LOW_EFFECT_RTOL = 1e-2
_ROTATION = 0.3
_CONSTANT_RTOL = 1e-9
_SEED = 20210107

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

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


# ---------------------------------------------------------------------------------- public API


def find_scale_invariant(
    model: nn.Module, example_inputs: Inputs, *, verbose: bool = False
) -> dict[str, int | None]:
    r"""The parameters of ``model`` on which its training-mode output is positively scale invariant.

    Parameters
    ----------
    model : torch.nn.Module
        any model; it is not modified (see the module documentation for the decision rule)
    example_inputs : torch.Tensor or tuple of torch.Tensor
        a training batch, passed as ``model(*example_inputs)``; BatchNorm needs more than one
        sample
    verbose : bool
        print one line per candidate weight saying what was decided and why

    Returns
    -------
    dict
        parameter name → group axis (the ``dim`` of :class:`~psi_geoopt.PSIManifold`), the
        finest grouping that holds: the output-channel axis where each output channel is
        invariant on its own, ``None`` where only the whole tensor is. Empty when nothing is
        (e.g. a model without normalization).
    """
    probe = _Probe(model, example_inputs)
    decisions = probe.decide_all()
    if verbose:
        print(probe.summary(decisions))
    return {name: d.dim for name, d in decisions.items() if d.invariant}


def to_psi(
    model: nn.Module,
    example_inputs: Inputs,
    names: Iterable[str] | Mapping[str, int | None] | None = None,
    check: bool = True,
) -> dict[str, PSIManifold]:
    r"""Replace the PSI weights of ``model``, in place, by :class:`geoopt.ManifoldParameter` s.

    Each converted parameter keeps its name, storage, values, dtype, device and
    ``requires_grad``; a parameter shared by several modules stays shared. Only the class of
    the parameter changes (to :class:`geoopt.ManifoldParameter` on
    :class:`~psi_geoopt.PSIManifold` ``(dim)``), so ``state_dict`` s load both ways between a
    converted and a plain model. Converting twice changes nothing. Build the optimizer after
    this call.

    Parameters
    ----------
    model : torch.nn.Module
        the model to convert
    example_inputs : torch.Tensor or tuple of torch.Tensor
        a training batch (see :func:`find_scale_invariant`)
    names : list of str, or dict name → dim, optional
        ``None`` (default): every parameter :func:`find_scale_invariant` finds, with its
        grouping. A list: exactly these parameters, each with the finest grouping that holds.
        A dict: exactly these parameters with the given group axes.
    check : bool
        check every name of ``names`` (structurally and numerically, for the given ``dim``
        where ``names`` is a dict) and raise :class:`ValueError` naming those that are not
        scale invariant; then nothing is converted. ``False`` converts ``names`` unchecked
        (names of a list that are not found invariant get ``dim=None``).

    Returns
    -------
    dict
        converted parameter name → its :class:`~psi_geoopt.PSIManifold`
    """
    _check_model("to_psi", model)
    if not isinstance(check, bool):
        raise TypeError(f"to_psi: `check` must be a bool, got {check!r}")
    parameters = dict(model.named_parameters())
    if names is None:
        targets = find_scale_invariant(model, example_inputs)
        if not targets:
            warnings.warn(
                f"to_psi: no scale-invariant parameter found in {type(model).__name__}; "
                "nothing converted (call find_scale_invariant(..., verbose=True) to see why)",
                stacklevel=2,
            )
    else:
        targets = _requested(names, parameters)
        if check or not isinstance(names, Mapping):
            targets = _checked(model, example_inputs, targets, check)
    manifolds = {name: PSIManifold(dim) for name, dim in targets.items()}
    for name, manifold in manifolds.items():
        try:
            manifold.assert_check_point(parameters[name].detach())
        except ValueError as error:
            raise ValueError(f"to_psi: parameter {name!r} cannot be a PSI point: {error}") from None
    for name, manifold in manifolds.items():
        _replace_parameter(model, parameters[name], manifold)
    return manifolds


def param_groups(model: nn.Module, weight_decay: float = 0.0, **overrides) -> list[dict]:
    r"""Optimizer parameter groups for a model converted by :func:`to_psi`.

    Every parameter appears exactly once (a shared one once, a frozen one too, so that
    unfreezing it later needs no new optimizer; optimizers skip parameters without a
    gradient): the PSI parameters
    (:class:`geoopt.ManifoldParameter` on :class:`~psi_geoopt.PSIManifold`) in one group with
    ``weight_decay=0`` (weight decay on a PSI group is radial, so the projection removes it
    anyway) and ``overrides`` on top, every other parameter in one group with
    ``weight_decay``. Other hyper-parameters come from the optimizer's defaults, e.g.
    ``psi_geoopt.optim.RiemannianSGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)`` or
    ``geoopt.optim.RiemannianAdam(param_groups(model, 1e-2, lr=0.01), lr=1e-3)``. Empty groups
    are left out.

    Parameters
    ----------
    model : torch.nn.Module
        the model
    weight_decay : float
        weight decay of the parameters that are not PSI
    **overrides
        hyper-parameters of the PSI group only (e.g. ``lr=0.03``), given to the optimizer as
        they are
    """
    _check_model("param_groups", model)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise TypeError(f"param_groups: `weight_decay` must be a number, got {weight_decay!r}")
    if not weight_decay >= 0:
        raise ValueError(f"param_groups: `weight_decay` must be >= 0, got {weight_decay!r}")
    if "params" in overrides:
        raise ValueError("param_groups: `params` cannot be overridden")
    parameters = list(model.parameters())
    psi = [p for p in parameters if _is_psi(p)]
    euclidean = [p for p in parameters if not _is_psi(p)]
    groups = []
    if euclidean:
        groups.append({"params": euclidean, "weight_decay": float(weight_decay)})
    if psi:
        groups.append({"params": psi, "weight_decay": 0.0, **overrides})
    return groups


# ------------------------------------------------------------------------- name handling


def _check_model(caller: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: `model` must be a torch.nn.Module, got {type(model).__name__}")


def _is_psi(p: torch.Tensor) -> bool:
    return isinstance(p, geoopt.ManifoldParameter) and isinstance(p.manifold, PSIManifold)


def _requested(names, parameters: dict[str, nn.Parameter]) -> dict[str, int | type | None]:
    """``names`` as a dict name → dim (``_FINEST`` where the caller gave no dim), validated."""
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(
            f"to_psi: `names` must be a list of parameter names or a dict name -> dim, "
            f"got {names!r}"
        )
    requested = dict(names) if isinstance(names, Mapping) else dict.fromkeys(names, _FINEST)
    for name, dim in requested.items():
        if not isinstance(name, str):
            raise TypeError(f"to_psi: parameter names must be str, got {name!r}")
        if name not in parameters:
            close = difflib.get_close_matches(name, list(parameters), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"to_psi: the model has no parameter {name!r}{hint}")
        if dim is not _FINEST and dim is not None:
            if isinstance(dim, bool) or not isinstance(dim, int):
                raise TypeError(f"to_psi: the dim of {name!r} must be an int or None, got {dim!r}")
            rank = parameters[name].dim()
            if not -rank <= dim < rank:
                raise ValueError(f"to_psi: dim={dim} is out of range for {name!r} of rank {rank}")
    return requested


class _FINEST:
    """Marker: the caller named a parameter without a grouping; use the finest that holds."""


def _checked(model, example_inputs, requested, check: bool) -> dict[str, int | None]:
    probe = _Probe(model, example_inputs)
    targets, failures = {}, []
    for name, dim in requested.items():
        if dim is _FINEST:
            decision = probe.decide(name)
        else:
            decision = probe.decide(name, dims=(dim,))
        if decision.invariant:
            targets[name] = decision.dim
        elif check:
            wanted = "" if dim is _FINEST else f" with dim={dim}"
            failures.append(f"{name!r}{wanted}: {decision.reason}")
        else:
            targets[name] = None if dim is _FINEST else dim
    if failures:
        raise ValueError(
            "to_psi: not positively scale invariant, nothing converted:\n  " + "\n  ".join(failures)
        )
    return targets


def _replace_parameter(model: nn.Module, old: nn.Parameter, manifold: PSIManifold) -> None:
    """Put a ManifoldParameter sharing ``old``'s storage wherever ``old`` is registered."""
    if _is_psi(old) and old.manifold.dim == manifold.dim:
        return
    new = geoopt.ManifoldParameter(old.data, manifold=manifold, requires_grad=old.requires_grad)
    for module in model.modules():
        for key, value in module._parameters.items():
            if value is old:
                module._parameters[key] = new


# -------------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class _Decision:
    invariant: bool
    dim: int | None
    reason: str


@dataclass
class _Flow:
    r"""A value computed from the probed weight: :math:`F \odot x + O` (``offset=None``: O = 0)."""

    factor: torch.Tensor
    offset: torch.Tensor | None = None


class _Bad:
    """A value that depends on the probed weight in a way no normalization undoes."""

    def __init__(self, reason: str):
        self.reason = reason


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
