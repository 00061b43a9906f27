r"""The numeric test: rescale groups of weights of the probed copy and compare its outputs.

Every forward pass runs with the random seed fixed (dropout draws the same masks). A set of
groupings passes when multiplying every group by its own factor :math:`10^{U(-2, 2)}`, all
weights at once, changes no output by more than ``invariance_rtol`` times its largest entry;
where a set fails, it is split in halves until the weights that fail are found (a failing
weight among :math:`n` costs about :math:`2 \log_2 n` forward passes).

A weight has an effect on the output when the gradient :math:`g` of
:math:`L = \sum_j \langle r_j, y_j \rangle / \max |y_j|` (:math:`y_j` the outputs, :math:`r_j`
standard normal) does not vanish: rotating each group :math:`w_k` by an angle :math:`\theta`
towards :math:`g_k` changes :math:`L` by :math:`\theta \sum_k \|w_k\| \|g_k\|` to first order, so
:math:`e = \theta \sum_k \|w_k\| \|g_k\| / \|r\|`, with :math:`\theta = 0.3`, is at first order
a lower bound on the change of the outputs (relative to their largest entries, in the
Euclidean norm). One backward pass gives it for every weight; a weight with
:math:`e \le` ``effect_rtol`` is reported as having no effect.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..manifold import PSIManifold
from .tracing import SEED, ProbeCopy, floating_leaves

SCALE_DECADES = 2.0
ROTATION = 0.3
INVARIANCE_RTOL = 1e-7
EFFECT_RTOL = 1e-6
LOW_INVARIANCE_RTOL = 1e-4
"""Where float64 does not run."""
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
        self.forward = probe.forward
        self.inputs = probe.inputs
        self.parameters = probe.parameters
        self.baseline = probe.baseline
        if probe.precision_note is None:
            self.invariance_rtol, self.effect_rtol = INVARIANCE_RTOL, EFFECT_RTOL
        else:
            self.invariance_rtol, self.effect_rtol = LOW_INVARIANCE_RTOL, LOW_EFFECT_RTOL

    def test(
        self, groupings: Mapping[str, int | None]
    ) -> tuple[dict[str, float], dict[str, float]]:
        """The weights of ``groupings`` whose rescaling changes the output (name → relative
        change), and the effects of the others (name → first-order effect, see the module doc).

        All are rescaled at once, and their effects measured there (one forward and backward
        pass); a set that fails is split in halves, down to single weights, and the effects of
        the weights that pass are then measured at their own values.
        """
        if not groupings:
            return {}, {}
        change, effects = self.rescale(groupings, effects_of=groupings)
        if change <= self.invariance_rtol:
            return {}, effects
        failures = self._split(groupings, change)
        passed = {name: dim for name, dim in groupings.items() if name not in failures}
        return failures, self.rescale({}, effects_of=passed)[1] if passed else {}

    def _split(self, groupings: Mapping[str, int | None], change: float) -> dict[str, float]:
        """The failing weights of ``groupings``, whose joint rescaling changed the output."""
        if len(groupings) == 1:
            return dict.fromkeys(groupings, change)
        items = list(groupings.items())
        failures = {}
        for half in (dict(items[: len(items) // 2]), dict(items[len(items) // 2 :])):
            half_change = self.rescale(half)[0]
            if half_change > self.invariance_rtol:
                failures.update(self._split(half, half_change))
        return failures

    def rescale(
        self,
        groupings: Mapping[str, int | None],
        effects_of: Mapping[str, int | None] | None = None,
    ) -> tuple[float, dict[str, float]]:
        """The relative change of the outputs when every group of ``groupings`` is multiplied by
        its own random factor, and the effects of the weights ``effects_of`` at that point
        (``max |y - y_ref| / max |y_ref|`` over the outputs; inf where one is not finite)."""
        generator = torch.Generator().manual_seed(SEED)
        originals = {name: self.parameters[name].data for name in groupings}
        effects_of = effects_of or {}
        weights = [self.parameters[name] for name in effects_of]
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
            torch.manual_seed(SEED)
            with torch.set_grad_enabled(bool(weights)):
                outputs = floating_leaves(self.forward(*self.inputs))
            change = _largest_change(outputs, self.baseline)
            if not weights or not change <= self.invariance_rtol:
                return change, {}
            return change, self._effects(effects_of, outputs)
        finally:
            for weight, flag in zip(weights, flags, strict=True):
                weight.requires_grad_(flag)
            for name, original in originals.items():
                self.parameters[name].data = original

    def _effects(
        self, groupings: Mapping[str, int | None], outputs: list[torch.Tensor]
    ) -> dict[str, float]:
        """The effect of each weight of ``groupings`` from one backward pass from ``outputs``."""
        generator = torch.Generator().manual_seed(SEED + 2)
        loss, norm = None, 0.0
        for y, reference in zip(outputs, self.baseline, strict=True):
            if y.requires_grad and y.numel():
                r = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y)
                scale = reference.abs().max().clamp_min(torch.finfo(y.dtype).tiny)
                term = (r * y).sum() / scale
                loss = term if loss is None else loss + term
                norm += float(r.square().sum())
        if loss is None:
            return dict.fromkeys(groupings, 0.0)
        weights = [self.parameters[name] for name in groupings]
        gradients = torch.autograd.grad(loss, weights, allow_unused=True)
        effects = {}
        for (name, dim), weight, gradient in zip(
            groupings.items(), weights, gradients, strict=True
        ):
            if gradient is None:
                effects[name] = 0.0
            else:
                w, g = _group_rows(weight.detach(), dim), _group_rows(gradient, dim)
                effects[name] = ROTATION * float((w.norm(dim=1) * g.norm(dim=1)).sum()) / norm**0.5
        return effects


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
