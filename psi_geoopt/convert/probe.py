"""The probe: decides every candidate weight of a model, structurally and numerically."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .numeric import NumericProbe, not_a_point
from .report import Decision, ScaleInvarianceReport
from .structural import StructuralTest
from .tracing import Groupings, Inputs, prepare

NOT_A_CANDIDATE = "not the weight of a Linear/Conv/ConvTranspose module or of F.linear/F.conv*"
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
        self.structural = None
        if self.copy.graph_module is not None:
            self.structural = StructuralTest(self.copy)

    @property
    def candidates(self) -> dict[str, Groupings]:
        return self.copy.candidates

    def decide_all(self) -> dict[str, Decision]:
        """Decide every candidate weight, each for the groupings of its kind."""
        return self.decide(dict.fromkeys(self.candidates))

    def decide(self, requests: Mapping[str, Groupings | None]) -> dict[str, Decision]:
        """Accept for each weight of ``requests`` the first of its groupings that holds.

        ``requests`` maps names to the groupings to try (None: the candidate's, finest first).
        In rounds: every weight proposes its next grouping that passes the structural test (on
        traced models) and is a point of the manifold; the proposals are rescaled together
        (:meth:`~.numeric.NumericProbe.test`); the weights that fail go on to their next
        grouping. The backward pass of the joint rescaling tells which have an effect.
        """
        decisions: dict[str, Decision] = {}
        queue: dict[str, list[int | None]] = {}
        for name, dims in requests.items():
            if name not in self.candidates:
                decisions[name] = Decision(False, None, NOT_A_CANDIDATE)
            elif not self.copy.has_normalization:
                decisions[name] = Decision(False, None, "the model has no normalization layer")
            else:
                queue[name] = list(self.candidates[name] if dims is None else dims)
        reasons: dict[str, list[str]] = {name: [] for name in queue}
        accepted: dict[str, tuple[int | None, tuple[str, ...]]] = {}
        effects: dict[str, float] = {}
        with self.copy.random_state():
            while queue:
                proposed = {}
                for name in list(queue):
                    proposal = self._propose(name, queue[name], reasons[name])
                    if proposal is None:
                        del queue[name]
                    else:
                        proposed[name] = proposal
                failures, passed = self.numeric.test({n: d for n, (d, _) in proposed.items()})
                effects.update(passed)
                for name, (dim, removed_by) in proposed.items():
                    if name in failures:
                        reasons[name].append(f"dim={dim}: {failures[name]}")
                    else:
                        accepted[name] = (dim, removed_by)
                        del queue[name]
        for name in reasons:
            if name not in accepted:
                decisions[name] = Decision(False, None, "; ".join(reasons[name]))
                continue
            dim, removed_by = accepted[name]
            if effects[name] > self.numeric.effect_rtol:
                reason = "; ".join([_accepted_reason(removed_by), *reasons[name]])
                decisions[name] = Decision(True, dim, reason)
            else:
                change = f"relative change {effects[name]:.2g} when rotated"
                reasons[name].append(f"dim={dim}: it has no effect on the output ({change})")
                decisions[name] = Decision(False, None, "; ".join(reasons[name]))
        return {name: decisions[name] for name in requests}

    def _propose(
        self, name: str, dims: list[int | None], reasons: list[str]
    ) -> tuple[int | None, tuple[str, ...]] | None:
        """The next grouping of ``dims`` (consumed) that passes the structural test and is a
        point of the manifold, with the normalizations that remove its scale; None if none."""
        while dims:
            dim = dims.pop(0)
            reason, removed_by = None, ()
            if self.structural is not None:
                verdict = self.structural(self.parameters[name], dim)
                reason, removed_by = verdict.reason, verdict.removed_by
            if reason is None:
                reason = not_a_point(self.copy.original(name), dim)
            if reason is None:
                return dim, removed_by
            reasons.append(f"dim={dim}: {reason}")
        return None

    def report(self, decisions: dict[str, Decision]) -> ScaleInvarianceReport:
        """``decisions`` with the notes on how the probe ran."""
        notes = []
        if self.copy.precision_note is not None:
            notes.append(f"float64 forward failed ({self.copy.precision_note}): own precision")
        if self.copy.values_note is not None:
            notes.append(
                f"forward with generic parameter values failed ({self.copy.values_note}): "
                "the model's own values decide, and the answer may depend on them"
            )
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


def _accepted_reason(removed_by: tuple[str, ...]) -> str:
    if not removed_by:
        return "rescaling its groups leaves the output unchanged (numeric probe only)"
    return "scale removed by " + ", ".join(removed_by)
