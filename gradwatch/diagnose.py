"""Diagnosis rules: pure functions from a :class:`HistoryView` to a :class:`Diagnosis`.

Principles (see ``Thresholds`` for the numbers):

- *Scale invariance.* Vanishing is a decay **across depth**: early layers' gradients relative to
  their own weights (``grad_to_weight``), or the backward signal ``dL/d(output)``, orders of
  magnitude below the late layers'. Multiplying the loss by a constant shifts every layer alike
  and changes nothing. Only like is compared with like: layers with a matrix weight (Linear,
  Conv, RNN), not norm layers or embeddings (sparse row updates make their ratio small by design).
- *No gradient is not a small gradient.* Frozen/unused parameters (``grad is None``) and layers
  whose gradient is exactly zero are left out of the depth comparison.
- *Sustained, not transient.* A condition must hold in ``persistence`` of the window's steps.
- *Cause before symptom.* Each finding looks for its cause (saturating activations, weights far
  from their init scale, recurrent layers, an optimizer invariant to gradient scale) and ranks
  the fixes that address that cause. Clipping caps large gradients: it is recommended for
  exploding or non-finite gradients only, never for vanishing ones, and not as the cure for an
  over-scaled initialisation under Adam-like optimizers (they are invariant to gradient scale).

One module per finding family (``diagnose_vanishing``, ``diagnose_exploding``,
``diagnose_nonfinite``, ``diagnose_activations``, plus ``spikes`` and ``precision``), sharing
``diagnose_context`` (per-layer facts) and ``diagnose_depth`` (depth-profile maths); this module
runs them, orders the findings, and builds the per-layer table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradwatch import causes
from gradwatch.diagnose_activations import activation_findings
from gradwatch.diagnose_context import RuleContext
from gradwatch.diagnose_depth import nanmedian
from gradwatch.diagnose_exploding import exploding_findings
from gradwatch.diagnose_nonfinite import nonfinite_findings
from gradwatch.diagnose_vanishing import vanishing_findings
from gradwatch.findings import Diagnosis, Finding, LayerRow
from gradwatch.fixes.registry import fix_reason
from gradwatch.history import HistoryView
from gradwatch.metrics import ACTIVATION, GRAD
from gradwatch.precision import underflow_findings
from gradwatch.spikes import spike_findings
from gradwatch.thresholds import Thresholds


def _reasons(kind: str, fixes: Sequence[str], **fmt: Any) -> tuple[str, ...]:
    out = []
    for f in fixes:
        text = fix_reason(kind, f)
        try:
            out.append(text.format(**fmt))
        except (KeyError, ValueError):
            out.append(text)
    return tuple(out)


def _rows(ctx: RuleContext, findings: list[Finding]) -> tuple[LayerRow, ...]:
    view = ctx.view
    flags: dict[str, list[str]] = {}
    for f in findings:
        for name in f.layers:
            flags.setdefault(name, []).append(f.kind)
    med = nanmedian(view.grad.astype(np.float64), axis=0) if len(view.steps) else np.full((len(view.layers), len(GRAD)), np.nan)
    act_m = nanmedian(view.act.astype(np.float64), axis=0) if len(view.sample_steps) and view.activations else None
    feeding: dict[str, tuple[float, float]] = {}
    if act_m is not None:
        for i, m in enumerate(view.activation_meta):
            if m.feeding_layer:
                feeding[m.feeding_layer] = (float(act_m[i, ACTIVATION["dead_frac"]]), float(act_m[i, ACTIVATION["saturated_frac"]]))
                for f in findings:
                    if view.activations[i] in f.layers:
                        flags.setdefault(m.feeding_layer, []).append(f.kind)
    rows = []
    for i, name in enumerate(view.layers):
        dead, sat = feeding.get(name, (math.nan, math.nan))
        rows.append(LayerRow(
            name=name,
            kind=view.layer_meta[i].type_name,
            depth=i,
            grad_norm=float(med[i, GRAD["grad_norm"]]),
            grad_mean_abs=float(med[i, GRAD["grad_mean_abs"]]),
            grad_max_abs=float(med[i, GRAD["grad_max_abs"]]),
            grad_to_weight=float(med[i, GRAD["grad_to_weight"]]),
            weight_norm=float(ctx.weight_norm[i]) if len(ctx.weight_norm) else math.nan,
            dead_frac=dead,
            saturated_frac=sat,
            flags=tuple(dict.fromkeys(flags.get(name, []))),
        ))
    return tuple(rows)


_ORDER = {"nonfinite": 0, "exploding": 1, "vanishing": 2, "dead_units": 3, "saturation": 4, "spike": 5, "underflow": 6}


def _spike(ctx: RuleContext) -> list[Finding]:
    return spike_findings(ctx.view, ctx.th)


def _underflow(ctx: RuleContext) -> list[Finding]:
    return underflow_findings(ctx.view, ctx.th)


#: every rule, by the name a failure note gives it, in the order they run
_RULES: dict[str, Callable[[RuleContext], list[Finding]]] = {
    "nonfinite": nonfinite_findings,
    "exploding": exploding_findings,
    "vanishing": vanishing_findings,
    "activation_findings": activation_findings,
    "spike": _spike,
    "underflow": _underflow,
}


def diagnose(view: HistoryView, thresholds: Thresholds | None = None, structure: dict | None = None) -> Diagnosis:
    """Diagnose a window of history. Pure: no torch, no model; never raises on odd histories.

    Args:
        view: the window to look at (``History.view(last=thresholds.window)``).
        thresholds: overrides; defaults to ``Thresholds()``.
        structure: the observed forward structure to attach for fixes (``Diagnosis.structure``).

    Returns:
        A :class:`Diagnosis` with findings ordered most severe (and most causal) first.
    """
    th = thresholds or Thresholds()
    notes: list[str] = []
    try:
        ctx = RuleContext(view, th, _reasons)
        findings: list[Finding] = []
        for name, rule in _RULES.items():
            try:
                findings.extend(rule(ctx))
            except Exception as exc:  # a rule must never take the training run down
                notes.append(f"rule {name} failed on this history: {type(exc).__name__}: {exc}")
        findings = causes.attribute_symptoms(findings, ctx.notes)
        findings.sort(key=lambda f: (f.severity != "critical", _ORDER[f.kind]))
        rows = _rows(ctx, findings)
    except Exception as exc:
        return Diagnosis(notes=(f"diagnosis failed on this history: {type(exc).__name__}: {exc}",), structure=dict(structure or {}))
    notes.extend(ctx.notes)
    if len(view.steps) < th.min_steps:
        notes.append(f"only {len(view.steps)} collected step(s) so far (< {th.min_steps}): trend rules wait for more data")
    no_grad = [n for i, n in enumerate(view.layers) if len(view.steps) and not np.isfinite(ctx.gnorm[:, i]).any()]
    if no_grad:
        notes.append(f"{len(no_grad)} layer(s) received no gradient (frozen or unused): {', '.join(no_grad[:5])}{'...' if len(no_grad) > 5 else ''}")
    steps = (int(view.steps[0]), int(view.steps[-1])) if len(view.steps) else None
    return Diagnosis(findings=tuple(findings), layers=rows, steps=steps, notes=tuple(notes), structure=dict(structure or {}))
