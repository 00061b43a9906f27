"""The public functions of :mod:`psi_geoopt.convert`: find, convert, group."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Mapping

import geoopt
import torch
from torch import nn

from ..manifold import PSIManifold
from .probe import Probe
from .report import ScaleInvarianceReport
from .tracing import Inputs
from .tracing import check_model as _check_model

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
        print one line per candidate weight saying what was decided and why (the text of
        :func:`explain_scale_invariance`'s report)

    Returns
    -------
    dict
        parameter name → group axis (the ``dim`` of :class:`~psi_geoopt.PSIManifold`), the
        finest grouping that holds: the output-channel axis where each output channel is
        invariant on its own, ``None`` where only the whole tensor is. Empty when nothing is
        (e.g. a model without normalization).
    """
    report = explain_scale_invariance(model, example_inputs)
    if verbose:
        print(report)
    return report.found


def explain_scale_invariance(model: nn.Module, example_inputs: Inputs) -> ScaleInvarianceReport:
    r"""The decision on every candidate weight of ``model``, with its reason.

    What :func:`find_scale_invariant` decides, as data: ``report.found`` is its result,
    ``report.decisions[name]`` the :class:`~psi_geoopt.convert.Decision` on each weight of a
    linear map (``invariant``, ``dim``, ``reason``), ``report.notes`` how the probe ran, and
    ``print(report)`` the explanation ``verbose=True`` prints.

    Parameters
    ----------
    model : torch.nn.Module
        any model; it is not modified
    example_inputs : torch.Tensor or tuple of torch.Tensor
        a training batch, passed as ``model(*example_inputs)``

    Returns
    -------
    ScaleInvarianceReport
    """
    probe = Probe(model, example_inputs)
    return probe.report(probe.decide_all())


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
    decisions = Probe(model, example_inputs).decide(
        {name: None if dim is _FINEST else (dim,) for name, dim in requested.items()}
    )
    targets, failures = {}, []
    for name, dim in requested.items():
        decision = decisions[name]
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
    if _is_psi(old) and (old.manifold.dim, old.manifold.ndim) == (manifold.dim, manifold.ndim):
        return
    new = geoopt.ManifoldParameter(old.data, manifold=manifold, requires_grad=old.requires_grad)
    for module in model.modules():
        for key, value in module._parameters.items():
            if value is old:
                module._parameters[key] = new
