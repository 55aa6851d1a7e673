"""Activation rules: dead ReLU units and saturated sigmoid/tanh outputs, from sampled steps."""

from __future__ import annotations

import math
import warnings

import numpy as np

from gradwatch.diagnose_context import RuleContext
from gradwatch.diagnose_depth import nanmedian
from gradwatch.findings import Finding
from gradwatch.metrics import ACTIVATION


def activation_findings(ctx: RuleContext) -> list[Finding]:
    view, th = ctx.view, ctx.th
    if not len(view.sample_steps) or not view.activations:
        return []
    dead = view.act[:, :, ACTIVATION["dead_frac"]].astype(np.float64)
    sat = view.act[:, :, ACTIVATION["saturated_frac"]].astype(np.float64)
    samples = view.act[:, :, ACTIVATION["unit_samples"]].astype(np.float64)
    dead = np.where(samples >= th.dead_min_samples, dead, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dead_m = np.nanmin(dead[-5:], axis=0)  # dead in every recent sample, not just unlucky once
    sat_m = nanmedian(sat, axis=0)
    findings = []
    dead_layers = [
        i for i, m in enumerate(view.activation_meta)
        if m.kind == "relu" and math.isfinite(dead_m[i]) and dead_m[i] >= th.dead_frac
    ]
    if dead_layers:
        names = [view.activations[i] for i in dead_layers]
        worst = max(dead_m[i] for i in dead_layers)
        feeding = [view.activation_meta[i].feeding_layer for i in dead_layers if view.activation_meta[i].feeding_layer]
        fixes = ("he_init", "swap_activation", "lower_lr")
        findings.append(Finding(
            kind="dead_units",
            layers=tuple(names),
            severity="critical" if worst >= th.dead_critical_frac else "warning",
            message=(f"Dead units: up to {worst:.0%} of the units of {', '.join(names[:3])} are inactive for every "
                     "input in the batch, so they receive no gradient."),
            evidence={"dead_frac": {view.activations[i]: float(dead_m[i]) for i in dead_layers},
                      "feeding_layers": feeding, "samples": int(len(view.sample_steps))},
            fixes=fixes,
            reasons=ctx.reasons("dead_units", fixes),
        ))
    sat_layers = [
        i for i, m in enumerate(view.activation_meta)
        if m.kind in ("sigmoid", "tanh", "hard") and not m.is_output and math.isfinite(sat_m[i]) and sat_m[i] >= th.saturated_frac
    ]
    if sat_layers:
        names = [view.activations[i] for i in sat_layers]
        worst = max(sat_m[i] for i in sat_layers)
        feeding = [view.activation_meta[i].feeding_layer for i in sat_layers if view.activation_meta[i].feeding_layer]
        layer_index = {n: i for i, n in enumerate(view.layers)}
        over = [f for f in feeding if f in layer_index and math.isfinite(ctx.he_scale[layer_index[f]])
                and ctx.he_scale[layer_index[f]] * math.sqrt(2.0) >= th.over_scaled_init]
        # cause before symptom: weights far above the Xavier/LeCun scale push pre-activations into
        # the flat region; re-initialising removes the cause and keeps the model's activations
        fixes = ("he_init", "swap_activation", "insert_batchnorm") if over else ("swap_activation", "insert_batchnorm", "he_init")
        findings.append(Finding(
            kind="saturation",
            layers=tuple(names),
            severity="critical" if worst >= th.saturated_critical_frac else "warning",
            message=(f"Saturation: up to {worst:.0%} of the outputs of {', '.join(names[:3])} sit in the flat region "
                     "of the activation, where its derivative is nearly zero."),
            evidence={"saturated_frac": {view.activations[i]: float(sat_m[i]) for i in sat_layers},
                      "feeding_layers": feeding, "over_scaled_feeding_layers": over, "activations": names, "samples": int(len(view.sample_steps))},
            fixes=fixes,
            reasons=ctx.reasons("saturation", fixes),
        ))
    return findings

