"""Plain-text rendering of a :class:`~gradwatch.Diagnosis` (what ``str(diagnosis)`` prints).

The renderer reads a diagnosis through the small protocols below rather than importing
:mod:`gradwatch.findings`, whose ``Diagnosis.__str__`` calls it: data does not depend on its view
and the view does not depend back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol


class ReportedFinding(Protocol):
    """What the report reads of a :class:`gradwatch.Finding`."""

    @property
    def kind(self) -> str: ...
    @property
    def layers(self) -> tuple[str, ...]: ...
    @property
    def severity(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def evidence(self) -> dict[str, Any]: ...
    @property
    def fixes(self) -> tuple[str, ...]: ...
    @property
    def reasons(self) -> tuple[str, ...]: ...


class ReportedRow(Protocol):
    """What the report reads of a row of the per-layer table (:class:`gradwatch.findings.LayerRow`)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def depth(self) -> int: ...
    @property
    def grad_norm(self) -> float: ...
    @property
    def grad_mean_abs(self) -> float: ...
    @property
    def grad_max_abs(self) -> float: ...
    @property
    def grad_to_weight(self) -> float: ...
    @property
    def dead_frac(self) -> float: ...
    @property
    def saturated_frac(self) -> float: ...
    @property
    def flags(self) -> tuple[str, ...]: ...


class ReportedDiagnosis(Protocol):
    """What the report reads of a :class:`gradwatch.Diagnosis`."""

    @property
    def findings(self) -> Sequence[ReportedFinding]: ...
    @property
    def layers(self) -> Sequence[ReportedRow]: ...
    @property
    def steps(self) -> tuple[int, int] | None: ...
    @property
    def notes(self) -> Sequence[str]: ...
    @property
    def code(self) -> str: ...
    @property
    def healthy(self) -> bool: ...


def _num(x: float) -> str:
    if x is None or not isinstance(x, int | float) or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.2e}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.3f}"


def _frac(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.0%}"


def _evidence_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return repr(value)


def _finding_lines(f: ReportedFinding) -> list[str]:
    layers = ", ".join(f.layers[:8]) + (f" (+{len(f.layers) - 8} more)" if len(f.layers) > 8 else "")
    lines = [f"[{f.severity.upper()}] {f.kind}: {f.message}", f"    layers: {layers}"]
    keys = [k for k in f.evidence if not isinstance(f.evidence[k], dict | list)]
    if keys:
        lines.append("    evidence: " + ", ".join(f"{k}={_evidence_value(f.evidence[k])}" for k in keys))
    for i, fix in enumerate(f.fixes):
        reason = f.reasons[i] if i < len(f.reasons) and f.reasons[i] else ""
        lines.append(f"    fix {i + 1}: {fix}" + (f" - {reason}" if reason else ""))
    return lines


def verdict(diagnosis: ReportedDiagnosis) -> str:
    """One line for training logs: why the run is healthy, or which findings it has in which layers.

    Training integrations log this instead of the whole report when the run is healthy: the report's
    per-layer table has one row per layer (94 for a small Transformer) and says nothing a healthy
    verdict does not. ``str(diagnosis)`` is the full report, for findings and on request.
    """
    d = diagnosis
    span = f" (steps {d.steps[0]}-{d.steps[1]}, {len(d.layers)} layers)" if d.steps else ""
    if d.healthy:
        return f"gradwatch diagnosis{span}: healthy - no vanishing, exploding, non-finite, dead or saturated layers found"
    kinds = "; ".join(f"{f.kind} ({f.severity}) in {', '.join(f.layers[:4])}{' ...' if len(f.layers) > 4 else ''}"
                      for f in d.findings)
    return f"gradwatch diagnosis{span}: {kinds}"


def for_logs(diagnosis: ReportedDiagnosis) -> str:
    """What training integrations log: the one-line :func:`verdict` when healthy, else the full report."""
    return verdict(diagnosis) if diagnosis.healthy else render_report(diagnosis)


def render_report(diagnosis: ReportedDiagnosis, max_layers: int = 60) -> str:
    """The readable report: verdict, findings with evidence and fixes, per-layer table in depth order."""
    d = diagnosis
    span = f" (steps {d.steps[0]}-{d.steps[1]})" if d.steps else ""
    if d.healthy:
        head = f"gradwatch diagnosis{span}: healthy - no vanishing, exploding, non-finite, dead, saturated, spiking or underflowing layers found"
    else:
        head = f"gradwatch diagnosis{span}: {len(d.findings)} finding(s)"
    lines = [head]
    for f in d.findings:
        lines.extend(_finding_lines(f))
    for note in d.notes:
        lines.append(f"note: {note}")
    if d.code:
        lines.append("suggested code (gradwatch.apply_fixes(model, diagnosis, dry_run=True).code):")
        lines.extend(f"    {line}" for line in d.code.splitlines())
    if d.layers:
        lines.append("")
        header = f"{'#':>3}  {'layer':<28} {'type':<14} {'grad_norm':>10} {'mean|g|':>10} {'max|g|':>10} {'grad/w':>10} {'dead':>5} {'sat':>5}  flags"
        lines.append(header)
        shown = d.layers if len(d.layers) <= max_layers else d.layers[: max_layers // 2] + d.layers[-max_layers // 2:]
        for i, row in enumerate(shown):
            if len(d.layers) > max_layers and i == max_layers // 2:
                lines.append(f"{'':>3}  ... {len(d.layers) - max_layers} layers not shown ...")
            name = row.name if len(row.name) <= 28 else "..." + row.name[-25:]
            lines.append(
                f"{row.depth:>3}  {name:<28} {row.kind[:14]:<14} {_num(row.grad_norm):>10} {_num(row.grad_mean_abs):>10} "
                f"{_num(row.grad_max_abs):>10} {_num(row.grad_to_weight):>10} {_frac(row.dead_frac):>5} {_frac(row.saturated_frac):>5}  "
                f"{','.join(row.flags)}"
            )
    return "\n".join(lines)
