r"""The numeric test: rescale groups of weights of the probed copy and compare its outputs.

Every forward pass runs with the random seed fixed (dropout draws the same masks). A set of
groupings passes when multiplying every group by its own factor :math:`10^{U(-2, 2)}`, all
weights at once, changes no output by more than ``invariance_rtol`` times its largest entry.

The same pass gives, by one backward pass, the gradient :math:`g` of
:math:`L = \sum_j \langle r_j, y_j \rangle / \max |y_j|` (:math:`y_j` the outputs, :math:`r_j`
standard normal) with respect to every weight. By Euler's theorem the radial derivative
:math:`\langle g_k, w_k \rangle` of an invariant group vanishes at every point; where
:math:`|\langle g_k, w_k \rangle| / (\|w_k\| \max_j \|g_j\|)` exceeds ``radial_rtol`` for
some group, the weight is not invariant for that grouping, and the others are tested again
without it. Where no radial derivative shows but the outputs changed, the set is split in
halves until the weights that fail are found (a failing weight among :math:`n` costs about
:math:`2 \log_2 n` forward passes).

A weight has an effect on the output when :math:`g` does not vanish (or, where it does,
when rotating every group by :math:`\theta` in a random direction changes the outputs by more
than ``effect_rtol`` relative to their largest entries): rotating each group
:math:`w_k` by an angle :math:`\theta`
towards :math:`g_k` changes :math:`L` by :math:`\theta \sum_k \|w_k\| \|g_k\|` to first order, so
:math:`e = \theta \sum_k \|w_k\| \|g_k\| / \|r\|`, with :math:`\theta = 0.3`, is at first order
a lower bound on the change of the outputs (relative to their largest entries, in the
Euclidean norm). One backward pass gives it for every weight; a weight with
:math:`e \le` ``effect_rtol`` is reported as having no effect.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import fx

from ..manifold import PSIManifold
from .tracing import SEED, ProbeCopy, floating_leaves

SCALE_DECADES = 2.0
ROTATION = 0.3
INVARIANCE_RTOL = 1e-7
RADIAL_RTOL = 1e-8
EFFECT_RTOL = 1e-6
LOW_INVARIANCE_RTOL = 1e-4
"""Where float64 does not run."""
LOW_RADIAL_RTOL = 1e-3
LOW_EFFECT_RTOL = 1e-3


def not_a_point(weight: torch.Tensor, dim: int | None) -> str | None:
    """The reason ``weight`` grouped along ``dim`` is no point of the PSI manifold, or None."""
    try:
        PSIManifold(dim).assert_check_point(weight.detach())
    except ValueError as error:
        return f"not a point of the PSI manifold ({error})"
    return None


class NumericProbe:
    """Forward and backward passes of a :class:`~.tracing.ProbeCopy` with weights rescaled."""

    def __init__(self, probe: ProbeCopy):
        self.probe = probe
        self.parameters = probe.parameters
        self.baseline = probe.baseline
        if probe.precision_note is None:
            self.invariance_rtol, self.radial_rtol = INVARIANCE_RTOL, RADIAL_RTOL
            self.effect_rtol = EFFECT_RTOL
        else:
            self.invariance_rtol, self.radial_rtol = LOW_INVARIANCE_RTOL, LOW_RADIAL_RTOL
            self.effect_rtol = LOW_EFFECT_RTOL

    def test(self, groupings: Mapping[str, int | None]) -> tuple[dict[str, str], dict[str, float]]:
        """The weights of ``groupings`` that fail (name → reason), and the effects of the others
        (name → first-order effect, see the module documentation).

        All are rescaled at once, with the gradients there (one forward and backward pass).
        A weight whose radial derivative does not vanish is not invariant: it fails, and the
        others are tested again without it. Where none does but the output changed, the set is
        split in halves until the failing weights are found.
        """
        if not groupings:
            return {}, {}
        measured = self.rescale(groupings, gradients=True)
        effects = {name: measured.effect(name, dim) for name, dim in groupings.items()}
        radial = {name: measured.radial(name, dim) for name, dim in groupings.items()}
        failures = {  # the radial derivative of a weight without effect is rounding noise
            name: f"rescaling its groups changes the output (radial derivative {value:.2g})"
            for name, value in radial.items()
            if effects[name] > self.effect_rtol and not value <= self.radial_rtol
        }
        if failures:
            rest = {name: dim for name, dim in groupings.items() if name not in failures}
            more, effects = self.test(rest)
            return {**failures, **more}, effects
        if measured.change > self.invariance_rtol:
            failures = {
                name: f"rescaling its groups changes the output (relative change {change:.2g})"
                for name, change in self._split(groupings, measured.change).items()
            }
        for name, dim in groupings.items():  # no first-order effect: try a finite rotation
            if name not in failures and not effects[name] > self.effect_rtol:
                effects[name] = self.rotated_change(name, dim)
        return failures, {name: e for name, e in effects.items() if name not in failures}

    def rotated_change(self, name: str, dim: int | None) -> float:
        """The relative change of the outputs when every group of ``name`` rotates by
        ``ROTATION`` in a random direction (a weight whose gradient vanishes may still act,
        e.g. through the signs of its entries)."""
        weight = self.parameters[name]
        original = weight.data
        manifold = PSIManifold(dim)
        generator = torch.Generator().manual_seed(SEED + 4)
        direction = torch.randn(original.shape, generator=generator, dtype=torch.float64)
        direction = manifold.proju(original, direction.to(original))
        angle = manifold.norm(original, direction, keepdim=True)
        try:
            weight.data = manifold.expmap(original, direction * (ROTATION / angle))
            with torch.no_grad():
                return _largest_change(self.outputs([name]), self.baseline)
        finally:
            weight.data = original

    def outputs(self, changed: Iterable[str]) -> list[torch.Tensor]:
        """The floating-point leaves of the output, as the recorded run gave them but for the
        weights ``changed``: on a traced copy, only the nodes computed from them run again (each
        with the random state it had: dropout draws the same masks), the others keep their
        recorded values; an untraced copy runs whole, with the seed it ran with."""
        probe = self.probe
        if probe.graph_module is None:
            torch.manual_seed(SEED)
            return floating_leaves(probe.module(*probe.inputs))
        dirty = set()
        pending = [node for name in changed for node in probe.owners(self.parameters[name])]
        while pending:
            node = pending.pop()
            if node not in dirty:
                dirty.add(node)
                pending.extend(node.users)
        return floating_leaves(_Replay(probe, dirty).run(*probe.inputs))

    def _split(self, groupings: Mapping[str, int | None], change: float) -> dict[str, float]:
        """The failing weights of ``groupings``, whose joint rescaling changed the output."""
        if len(groupings) == 1:
            return dict.fromkeys(groupings, change)
        items = list(groupings.items())
        failures = {}
        for half in (dict(items[: len(items) // 2]), dict(items[len(items) // 2 :])):
            half_change = self.rescale(half).change
            if half_change > self.invariance_rtol:
                failures.update(self._split(half, half_change))
        return failures

    def rescale(self, groupings: Mapping[str, int | None], gradients: bool = False) -> Measurement:
        """Multiply every group of ``groupings`` by its own random factor and run the copy: the
        relative change of the outputs (``max |y - y_ref| / max |y_ref|`` over the outputs, inf
        where one is not finite) and, where ``gradients``, the gradients there of a random
        projection of the outputs with respect to the weights. The weights are then restored."""
        generator = torch.Generator().manual_seed(SEED)
        originals = {name: self.parameters[name].data for name in groupings}
        weights = [self.parameters[name] for name in groupings] if gradients else []
        flags = [w.requires_grad for w in weights]
        try:
            for name, dim in groupings.items():
                shape = [1] * originals[name].dim()
                if dim is not None:
                    shape[dim] = originals[name].shape[dim]
                exponents = torch.rand(shape, generator=generator, dtype=torch.float64)
                factors = 10.0 ** (SCALE_DECADES * (2 * exponents - 1))
                self.parameters[name].data = originals[name] * factors.to(originals[name])
            for weight in weights:
                weight.requires_grad_(True)
            with torch.set_grad_enabled(gradients):
                outputs = self.outputs(groupings)
            measured = Measurement(_largest_change(outputs, self.baseline))
            if gradients:
                self._differentiate(measured, dict(zip(groupings, weights, strict=True)), outputs)
            return measured
        finally:
            for weight, flag in zip(weights, flags, strict=True):
                weight.requires_grad_(flag)
            for name, original in originals.items():
                self.parameters[name].data = original

    def _differentiate(
        self, measured: Measurement, weights: dict[str, torch.Tensor], outputs: list[torch.Tensor]
    ) -> None:
        """Fill ``measured`` with the gradients of :math:`L` (see the module documentation)."""
        generator = torch.Generator().manual_seed(SEED + 2)
        loss, squares = None, 0.0
        for y, reference in zip(outputs, self.baseline, strict=True):
            if y.requires_grad and y.numel():
                r = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y)
                scale = reference.abs().max().clamp_min(torch.finfo(y.dtype).tiny)
                term = (r * y).sum() / scale
                loss = term if loss is None else loss + term
                squares += float(r.square().sum())
        measured.projection_norm = squares**0.5
        gradients = [None] * len(weights)
        if loss is not None:
            gradients = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
        for (name, weight), gradient in zip(weights.items(), gradients, strict=True):
            point = weight.detach()
            measured.points[name] = point
            measured.gradients[name] = torch.zeros_like(point) if gradient is None else gradient


class _Replay(fx.Interpreter):
    """Runs the nodes ``dirty`` of a traced copy again; the others give their recorded values."""

    def __init__(self, probe: ProbeCopy, dirty: set[fx.Node]):
        super().__init__(probe.graph_module)
        self.probe = probe
        self.dirty = dirty

    def run_node(self, n: fx.Node):
        if n not in self.dirty:
            return self.probe.values[n]
        self.probe.random_states[n].set()
        return super().run_node(n)


@dataclass
class Measurement:
    """One run of the probed copy with weights rescaled: the relative change of the outputs,
    and (where asked) the weights there and the gradients of :math:`L` at them."""

    change: float
    points: dict[str, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    projection_norm: float = 0.0

    def radial(self, name: str, dim: int | None) -> float:
        r"""The largest radial derivative of a group, :math:`|\langle g_k, w_k \rangle| /
        (\|w_k\| \max_j \|g_j\|)`: zero, up to rounding, for a grouping that is invariant."""
        w, g = _group_rows(self.points[name], dim), _group_rows(self.gradients[name], dim)
        largest = g.norm(dim=1).max()
        if not largest > 0:
            return 0.0
        return float(((w * g).sum(dim=1).abs() / (w.norm(dim=1) * largest)).max())

    def effect(self, name: str, dim: int | None) -> float:
        r""":math:`e = \theta \sum_k \|w_k\| \|g_k\| / \|r\|` (see the module documentation)."""
        if not self.projection_norm > 0:
            return 0.0
        w, g = _group_rows(self.points[name], dim), _group_rows(self.gradients[name], dim)
        return ROTATION * float((w.norm(dim=1) * g.norm(dim=1)).sum()) / self.projection_norm


def _largest_change(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """max over outputs of ``max |y - y_ref| / max |y_ref|`` (inf for non-finite)."""
    change = 0.0
    for new, old in zip(outputs, reference, strict=True):
        if not old.numel():
            continue
        scale = old.abs().max().item()
        difference = (new.detach() - old).abs().max().item()
        if difference != difference or scale != scale:
            return float("inf")
        change = max(change, difference / max(scale, torch.finfo(torch.float64).tiny))
    return change


def _group_rows(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``t`` as a matrix with one row per group."""
    return t.reshape(1, -1) if dim is None else t.movedim(dim, 0).reshape(t.shape[dim], -1)
