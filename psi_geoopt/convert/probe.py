"""The probe: decides every candidate weight of a model, structurally and numerically."""

from __future__ import annotations

from torch import nn

from .numeric import NumericProbe, not_a_point
from .report import Decision, ScaleInvarianceReport
from .structural import structural_test
from .tracing import Groupings, Inputs, prepare

NO_NORMALIZATION = (
    "no normalization layer (BatchNorm, SyncBatchNorm, InstanceNorm, GroupNorm, LayerNorm, "
    "RMSNorm or their functional forms): no parameter is scale invariant"
)


class Probe:
    """A probed copy of a model (see :func:`~.tracing.prepare`) and the tests run on it."""

    def __init__(self, model: nn.Module, example_inputs: Inputs):
        self.copy = prepare(model, example_inputs)
        self.numeric = NumericProbe(self.copy)
        self.parameters = self.copy.parameters

    @property
    def candidates(self) -> dict[str, Groupings]:
        return self.copy.candidates

    def decide_all(self) -> dict[str, Decision]:
        """Decide every candidate; one joint rescaling replaces the per-weight ones if it holds."""
        if not self.copy.has_normalization or self.copy.graph_module is None:
            return {name: self.decide(name) for name in self.candidates}
        decisions, accepted = {}, {}
        with self.copy.random_state():
            for name, dims in self.candidates.items():
                reasons = []
                for dim in dims:
                    verdict = self._structural(name, dim)
                    reason = verdict.reason or not_a_point(self.parameters[name], dim)
                    if reason is None:
                        accepted[name] = (dim, verdict)
                        break
                    reasons.append(f"dim={dim}: {reason}")
                decisions[name] = Decision(False, None, "; ".join(reasons))
            groupings = {name: dim for name, (dim, _) in accepted.items()}
            jointly = self.numeric.rescaled_change(groupings) <= self.numeric.invariance_rtol
            for name, (dim, verdict) in accepted.items():
                if not jointly:
                    decisions[name] = self.decide(name)
                elif (reason := self.numeric.no_effect(name, dim)) is not None:
                    decisions[name] = Decision(False, None, f"dim={dim}: {reason}")
                else:
                    decisions[name] = Decision(True, dim, _accepted_reason(verdict.removed_by))
        return decisions

    def decide(self, name: str, dims: Groupings | None = None) -> Decision:
        """Accept the first grouping of ``dims`` (default: the candidate's) that holds."""
        if name not in self.candidates:
            return Decision(
                False,
                None,
                "not the weight of a Linear/Conv/ConvTranspose module or of F.linear/F.conv*",
            )
        if not self.copy.has_normalization:
            return Decision(False, None, "the model has no normalization layer")
        reasons = []
        for dim in self.candidates[name] if dims is None else dims:
            removed_by: tuple[str, ...] = ()
            with self.copy.random_state():
                reason = None
                if self.copy.graph_module is not None:
                    verdict = self._structural(name, dim)
                    reason, removed_by = verdict.reason, verdict.removed_by
                if reason is None:
                    reason = self.numeric.numeric_test(name, dim)
            if reason is None:
                return Decision(True, dim, _accepted_reason(removed_by))
            reasons.append(f"dim={dim}: {reason}")
        return Decision(False, None, "; ".join(reasons))

    def report(self, decisions: dict[str, Decision]) -> ScaleInvarianceReport:
        """``decisions`` with the notes on how the probe ran."""
        notes = []
        if self.copy.precision_note is not None:
            notes.append(f"float64 forward failed ({self.copy.precision_note}): own precision")
        if self.copy.trace_error is not None:
            notes.append(f"not traceable ({self.copy.trace_error}): numeric probe only")
        if not self.copy.has_normalization:
            notes.append(NO_NORMALIZATION)
        return ScaleInvarianceReport(
            model=self.copy.model_name,
            decisions=decisions,
            other_parameters=len(self.copy.names) - len(decisions),
            notes=tuple(notes),
        )

    def _structural(self, name: str, dim: int | None):
        return structural_test(self.copy.graph_module, self.copy.values, self.parameters[name], dim)


def _accepted_reason(removed_by: tuple[str, ...]) -> str:
    if not removed_by:
        return "rescaling its groups leaves the output unchanged (numeric probe only)"
    return "scale removed by " + ", ".join(removed_by)
