r"""The numeric test: rescale groups of weights of the probed copy and compare its outputs.

Every forward pass runs with the random seed fixed (dropout draws the same masks) and without
gradients. A grouping passes when multiplying the groups by factors :math:`10^{U(-2, 2)}`
changes no output by more than ``invariance_rtol`` times its largest entry, and rotating every
group by 0.3 rad away from itself changes some output by more than ``effect_rtol`` times its
largest entry (the weight has an effect).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from ..manifold import PSIManifold
from .tracing import SEED, ProbeCopy

SCALE_DECADES = 2.0
INVARIANCE_RTOL = 1e-7
EFFECT_RTOL = 1e-4
LOW_INVARIANCE_RTOL = 1e-4
"""Where float64 does not run."""
LOW_EFFECT_RTOL = 1e-2
ROTATION = 0.3


def not_a_point(weight: torch.Tensor, dim: int | None) -> str | None:
    """The reason ``weight`` grouped along ``dim`` is no point of the PSI manifold, or None."""
    try:
        PSIManifold(dim).assert_check_point(weight.detach())
    except ValueError as error:
        return f"not a point of the PSI manifold ({error})"
    return None


class NumericProbe:
    """Forward passes of a :class:`~.tracing.ProbeCopy` with some weights changed."""

    def __init__(self, probe: ProbeCopy):
        self.forward = probe.forward
        self.inputs = probe.inputs
        self.parameters = probe.parameters
        if probe.precision_note is None:
            self.invariance_rtol, self.effect_rtol = INVARIANCE_RTOL, EFFECT_RTOL
        else:
            self.invariance_rtol, self.effect_rtol = LOW_INVARIANCE_RTOL, LOW_EFFECT_RTOL
        self._baseline: list[torch.Tensor] | None = None

    def outputs(self) -> list[torch.Tensor]:
        """The floating-point leaves of the output, seed fixed."""
        torch.manual_seed(SEED)
        with torch.no_grad():
            leaves, _ = tree_flatten(self.forward(*self.inputs))
        return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]

    @property
    def baseline(self) -> list[torch.Tensor]:
        if self._baseline is None:
            self._baseline = self.outputs()
        return self._baseline

    def largest_change(self, reference: list[torch.Tensor]) -> float:
        """max over outputs of ``max |y - y_ref| / max |y_ref|`` (inf for non-finite)."""
        change = 0.0
        for new, old in zip(self.outputs(), reference, strict=True):
            scale = old.abs().max().item() if old.numel() else 0.0
            difference = (new - old).abs().max().item() if old.numel() else 0.0
            if difference != difference or scale != scale:
                return float("inf")
            change = max(change, difference / max(scale, torch.finfo(torch.float64).tiny))
        return change

    def numeric_test(self, name: str, dim: int | None) -> str | None:
        """The reason ``name`` grouped along ``dim`` fails the numeric test, or None."""
        reason = not_a_point(self.parameters[name], dim)
        if reason is None:
            change = self.rescaled_change({name: dim})
            if change > self.invariance_rtol:
                reason = f"rescaling its groups changes the output (relative change {change:.2g})"
        return reason if reason is not None else self.no_effect(name, dim)

    def rescaled_change(self, groupings: dict[str, int | None]) -> float:
        """Relative output change when every group of ``groupings`` gets a random factor."""
        reference = self.baseline
        generator = torch.Generator().manual_seed(SEED)
        originals = {name: self.parameters[name].detach().clone() for name in groupings}
        try:
            with torch.no_grad():
                for name, dim in groupings.items():
                    weight = self.parameters[name]
                    shape = [1] * weight.dim()
                    if dim is not None:
                        shape[dim] = weight.shape[dim]
                    exponents = torch.rand(shape, generator=generator, dtype=torch.float64)
                    weight.mul_((10.0 ** (SCALE_DECADES * (2 * exponents - 1))).to(weight))
            return self.largest_change(reference)
        finally:
            with torch.no_grad():
                for name, original in originals.items():
                    self.parameters[name].copy_(original)

    def no_effect(self, name: str, dim: int | None) -> str | None:
        """A reason if rotating every group by ``ROTATION`` leaves the output as it was."""
        reference = self.baseline
        weight = self.parameters[name]
        manifold = PSIManifold(dim)
        original = weight.detach().clone()
        generator = torch.Generator().manual_seed(SEED + 2)
        direction = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        direction = manifold.proju(original, direction.to(weight))
        angle = manifold.norm(original, direction, keepdim=True)
        try:
            with torch.no_grad():
                weight.copy_(manifold.expmap(original, direction * (ROTATION / angle)))
            change = self.largest_change(reference)
        finally:
            with torch.no_grad():
                weight.copy_(original)
        if not change > self.effect_rtol:
            return f"it has no effect on the output (relative change {change:.2g})"
        return None
