"""What :func:`~psi_geoopt.convert.explain_scale_invariance` returns: a decision per weight."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Decision:
    """Whether one candidate weight is positively scale invariant, and why.

    Attributes
    ----------
    invariant : bool
        the weight is PSI for the grouping ``dim``
    dim : int or None
        the group axis (the ``dim`` of :class:`~psi_geoopt.PSIManifold`) where ``invariant``;
        ``None`` otherwise, or where only the whole tensor is invariant
    reason : str
        what removes the scale where ``invariant`` (and why each finer grouping tried
        before fails), else why each grouping tried fails
    """

    invariant: bool
    dim: int | None
    reason: str


@dataclass(frozen=True)
class ScaleInvarianceReport:
    """The decisions of :func:`~psi_geoopt.find_scale_invariant` with their reasons.

    ``str(report)`` is the explanation ``find_scale_invariant(..., verbose=True)`` prints.

    Attributes
    ----------
    model : str
        the class name of the model
    decisions : dict
        candidate weight name → :class:`Decision`, in the model's parameter order; the
        candidates are the weights of linear maps (see :mod:`psi_geoopt.convert`)
    other_parameters : int
        the number of parameters that are not candidates
    notes : tuple of str
        how the probe ran where it could not run as usual (not traceable, not in float64,
        no normalization layer)
    """

    model: str
    decisions: dict[str, Decision] = field(default_factory=dict)
    other_parameters: int = 0
    notes: tuple[str, ...] = ()

    @property
    def found(self) -> dict[str, int | None]:
        """Name → group axis of the PSI weights: what :func:`find_scale_invariant` returns."""
        return {name: d.dim for name, d in self.decisions.items() if d.invariant}

    def __str__(self) -> str:
        lines = [f"find_scale_invariant({self.model}):"]
        lines += [f"  {note}" for note in self.notes]
        for name, decision in self.decisions.items():
            if decision.invariant:
                lines.append(f"  {name}: PSI, dim={decision.dim} ({decision.reason})")
            else:
                lines.append(f"  {name}: not PSI ({decision.reason})")
        others = self.other_parameters
        verb = "parameter is not a weight" if others == 1 else "parameters are not weights"
        lines.append(f"  ({others} other {verb} of linear maps)")
        return "\n".join(lines)
