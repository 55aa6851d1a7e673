"""Result types of a diagnosis: :class:`Finding` and :class:`Diagnosis`.

They are plain data (no torch), so a diagnosis can be built from a live run or from
TensorBoard logs alike, compared in tests, and serialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

FindingKind = Literal["vanishing", "exploding", "nonfinite", "dead_units", "saturation", "spike", "underflow"]
Severity = Literal["warning", "critical"]

FINDING_KINDS: tuple[str, ...] = ("nonfinite", "exploding", "vanishing", "dead_units", "saturation", "spike", "underflow")
SEVERITIES: tuple[str, ...] = ("warning", "critical")


def __getattr__(name: str) -> Any:
    """``FIX_NAMES``: deprecated, derived from the fix registry (use ``gradwatch.fixes.list_fixes()``)."""
    if name == "FIX_NAMES":
        from gradwatch.fixes.registry import list_fixes

        return tuple(list_fixes())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_fix_names(names: tuple[str, ...]) -> None:
    """Fix names are checked against the registry, imported on first use: this module stays torch-free."""
    if not names:
        return
    from gradwatch.fixes.registry import list_fixes

    known = list_fixes()
    unknown = [f for f in names if f not in known]
    if unknown:
        raise ValueError(f"unknown fix names {unknown}; allowed: {tuple(known)}")


@dataclass(frozen=True)
class Finding:
    """One problem the diagnosis found.

    Attributes:
        kind: ``"vanishing" | "exploding" | "nonfinite" | "dead_units" | "saturation" | "spike" | "underflow"``.
        layers: qualified module names as ``model.named_modules()`` spells them, early layers first.
        severity: ``"warning"`` or ``"critical"``.
        message: one sentence a practitioner understands.
        evidence: the numbers behind the finding.
        fixes: names of recommended fixes, most effective first.
        reasons: why each recommended fix follows from the cause (same order as ``fixes``).
    """

    kind: str
    layers: tuple[str, ...]
    severity: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fixes: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in FINDING_KINDS:
            raise ValueError(f"Finding.kind={self.kind!r} is not one of {FINDING_KINDS}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding.severity={self.severity!r} is not one of {SEVERITIES}")
        _check_fix_names(tuple(self.fixes))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "fixes", tuple(self.fixes))
        object.__setattr__(self, "reasons", tuple(self.reasons))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "layers": list(self.layers),
            "severity": self.severity,
            "message": self.message,
            "evidence": dict(self.evidence),
            "fixes": list(self.fixes),
            "reasons": list(self.reasons),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(
            kind=data["kind"],
            layers=tuple(data.get("layers", ())),
            severity=data["severity"],
            message=data.get("message", ""),
            evidence=dict(data.get("evidence", {})),
            fixes=tuple(data.get("fixes", ())),
            reasons=tuple(data.get("reasons", ())),
        )


@dataclass(frozen=True)
class LayerRow:
    """One row of the per-layer table in depth order (medians over the diagnosis window)."""

    name: str
    kind: str
    depth: int
    grad_norm: float = math.nan
    grad_mean_abs: float = math.nan
    grad_max_abs: float = math.nan
    grad_to_weight: float = math.nan
    weight_norm: float = math.nan
    dead_frac: float = math.nan
    saturated_frac: float = math.nan
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Diagnosis:
    """The outcome of :func:`gradwatch.diagnose`; ``str(diagnosis)`` is the readable report.

    Attributes:
        findings: problems found, most severe first.
        layers: per-layer table rows in depth order.
        steps: the collected-step range the diagnosis looked at, ``(first, last)``, or ``None``.
        notes: remarks that are not problems (e.g. layers without gradient, too little data).
        structure: what was seen of the model in a forward pass, as plain data:
            ``{"order": [module names in execution order],
            "input_shapes": {name: shape}, "output_shapes": {name: shape},
            "types": {name: class name}, "activations": {activation name: feeding layer name},
            "calls": {name: times it ran in the pass}}``.
            Empty when unknown (e.g. a diagnosis rebuilt from logs). Fixes use it to
            pick tensor layouts and shape-preserving blocks without guessing.
    """

    findings: tuple[Finding, ...] = ()
    layers: tuple[LayerRow, ...] = ()
    steps: tuple[int, int] | None = None
    notes: tuple[str, ...] = ()
    structure: dict[str, Any] = field(default_factory=dict)
    #: copy-pasteable code applying the recommended fixes to the user's own model (a dry run of
    #: :func:`gradwatch.apply_fixes`; filled when the diagnosis comes from a live watcher).
    code: str = ""

    @property
    def healthy(self) -> bool:
        """True when there is no finding at all."""
        return not self.findings

    def kinds(self) -> set[str]:
        return {f.kind for f in self.findings}

    def by_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def signature(self) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        """What identifies the set of findings (kind, severity, layers): changes when the picture changes."""
        return tuple((f.kind, f.severity, f.layers) for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "steps": list(self.steps) if self.steps else None,
            "findings": [f.to_dict() for f in self.findings],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        from gradwatch.report import render_report

        return render_report(self)
