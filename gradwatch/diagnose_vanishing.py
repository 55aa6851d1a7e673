"""Vanishing gradients: a decay across depth (grad-to-weight, or the backward signal) or through time.

Scale-invariant: only the decay of one layer relative to the others counts, sustained over the
window; the cause (recurrence, under-scaled weights, a compound init decay, saturating
activations) picks the fixes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch import causes
from gradwatch.diagnose_context import RECURRENT, RuleContext, loss_improvement
from gradwatch.diagnose_depth import depth_decay, log10_or_nan, per_step_decay
from gradwatch.findings import Finding
from gradwatch.metrics import SIGNAL


def vanishing_findings(ctx: RuleContext) -> list[Finding]:
    view, th = ctx.view, ctx.th
    if len(view.steps) < th.min_steps:
        return []
    names = view.layers
    evidence: dict[str, Any] = {}
    flagged: list[int] = []
    decades = 0.0
    signal_used = None

    # (a) grad-to-weight across depth (every step), matrix layers only
    cols = np.flatnonzero(ctx.matrix)
    if len(cols) >= th.min_depth_layers:
        logs = log10_or_nan(ctx.gtw[:, cols])
        holds = per_step_decay(logs, th.min_depth_layers, th.vanishing_decades, th.min_rank_correlation)
        profile = log10_or_nan(ctx.gtw_median[cols])
        r = depth_decay(profile, th.min_depth_layers)
        if holds.mean() >= th.persistence and r is not None and r[0] >= th.vanishing_decades:
            decades, signal_used = r[0], "grad_to_weight"
            late = float(r[2])
            flagged = [int(cols[i]) for i in range(len(cols)) if math.isfinite(profile[i]) and profile[i] <= late - th.vanishing_decades]
            evidence["steps_holding"] = float(holds.mean())

    # (b) backward signal dL/d(output) across depth (sampled steps)
    if signal_used is None and len(view.sample_steps) >= 1:
        logs = log10_or_nan(view.signal[:, :, SIGNAL["out_grad_rms"]])
        valid_cols = np.flatnonzero(np.isfinite(logs).any(axis=0))
        if len(valid_cols) >= th.min_depth_layers:
            holds = per_step_decay(logs[:, valid_cols], th.min_depth_layers, th.vanishing_decades, th.min_rank_correlation)
            profile = log10_or_nan(ctx.signal_in[valid_cols])
            r = depth_decay(profile, th.min_depth_layers)
            if holds.mean() >= th.persistence and r is not None and r[0] >= th.vanishing_decades:
                decades, signal_used = r[0], "out_grad_rms"
                late = float(r[2])
                flagged = [int(valid_cols[i]) for i in range(len(valid_cols)) if math.isfinite(profile[i]) and profile[i] <= late - th.vanishing_decades]
                evidence["samples_holding"] = float(holds.mean())

    # (c) through time (recurrent layers): dL/dx_t at the first steps vs the last steps
    temporal: dict[str, dict[str, Any]] = {}
    if len(view.sample_steps) and view.signal.shape[2] > SIGNAL["time_decay_decades"]:
        tdec = view.signal[:, :, SIGNAL["time_decay_decades"]].astype(np.float64)
        for i, name in enumerate(names):
            col = tdec[:, i][np.isfinite(tdec[:, i])]
            if not len(col) or float(np.median(col)) < th.vanishing_decades:
                continue
            decades_t = round(float(np.median(col)), 2)
            learning = loss_improvement(view)
            if ctx.types[i] == "RNN" and learning is not None and learning >= th.learning_loss_drop:
                # cause before symptom: the recurrence forgets, but the loss shows the model learns what
                # the task needs (a short-memory task is learnt by a forgetting RNN); only a note
                ctx.notes.append(f"the gradient through time in {name} decays {decades_t:.1f} orders of magnitude "
                                 f"over the sequence, but the loss fell {learning:.0%}: the task does not need the "
                                 "early steps; if it should, consider lstm_gru")
            elif ctx.types[i] == "RNN":
                temporal[name] = {"decades": decades_t, "samples": int(len(col)),
                                  "loss_drop": None if learning is None else round(learning, 3)}
            else:
                # gated recurrences are the cure already; their decay is what the task lets them forget
                ctx.notes.append(f"the gradient through time in {name} ({ctx.types[i]}) decays {decades_t:.1f} orders of "
                                 "magnitude over the sequence; if the task needs long memory, a forget-gate bias of 1 helps")
    temporal_flagged = list(temporal)

    findings = []
    if signal_used is not None and flagged:
        layer_names = [names[i] for i in flagged]
        evidence.update({
            "signal": signal_used,
            "decades": round(decades, 2),
            "ratio_first_to_last": float(10 ** (-decades)),
            "per_layer_grad_to_weight": {names[i]: float(ctx.gtw_median[i]) for i in range(len(names)) if math.isfinite(ctx.gtw_median[i])},
            "per_layer_out_grad_rms": {names[i]: float(ctx.signal_in[i]) for i in range(len(names)) if math.isfinite(ctx.signal_in[i])},
            "window_steps": [int(view.steps[0]), int(view.steps[-1])],
        })
        sat = ctx.hidden_saturating()
        recurrent = [names[i] for i in flagged if ctx.types[i] in RECURRENT]
        under = [names[i] for i in flagged if math.isfinite(ctx.he_scale[i]) and ctx.he_scale[i] < th.under_scaled_init * math.sqrt(0.5)]
        compound = None if recurrent or under else causes.vanishing_cause(view, ctx.chain, max(1.0, 0.5 * decades))
        if recurrent:
            fixes: tuple[str, ...] = ("lstm_gru", "he_init")
            cause = f"recurrent layers {recurrent} multiply gradients by the same Jacobian at every time step"
        elif under:
            # cause before symptom: tiny weights shrink the signal at every layer whatever the activation
            fixes = ("he_init", "insert_batchnorm", "residual")
            cause = f"weights of {under[:3]} are far below He/Xavier scale"
        elif compound is not None:
            # cause before symptom: modest per-layer deficits that compound along an un-normalised chain
            fixes, cause = compound.fixes, compound.text
        elif sat:
            # normalisation first: it keeps the model's activations and learning-rate regime; a swap
            # to unbounded ReLUs under a learning rate tuned for sigmoids can diverge (measured on the
            # plain sigmoid CNN reference: batchnorm 0.30x the unfixed loss, swap + he_init 1.0x)
            fixes = ("insert_batchnorm", "swap_activation", "he_init", "residual")
            cause = f"saturating activations ({', '.join(sat[:4])}{'...' if len(sat) > 4 else ''}) shrink the gradient at every layer"
        else:
            fixes = ("insert_batchnorm", "residual", "he_init")
            cause = "the signal shrinks through many unnormalised layers"
        evidence["activations"] = sat
        # the layers a fix must treat are the cause's, not only the symptom's: every under-scaled
        # layer (anywhere in the chain), or the whole decaying chain up to the output layer
        matrix_cols = [i for i in range(len(names)) if ctx.matrix[i]]
        if under:
            evidence["fix_layers"] = [names[i] for i in matrix_cols
                                      if math.isfinite(ctx.he_scale[i]) and ctx.he_scale[i] < th.under_scaled_init * math.sqrt(0.5)]
        elif compound is not None:
            evidence["fix_layers"] = compound.fix_layers
            evidence.update(compound.evidence)
        else:
            chain = [i for i in matrix_cols[:-1] if i >= flagged[0]]
            evidence["fix_layers"] = [names[i] for i in chain] or layer_names
        evidence["cause"] = cause
        severity = "critical" if decades >= th.vanishing_critical_decades else "warning"
        learning = loss_improvement(view)
        if compound is not None and learning is not None and learning < th.learning_loss_drop:
            severity = "critical"  # the compound decay blocks training: the loss has not moved
        what = "gradient relative to weights" if signal_used == "grad_to_weight" else "backward signal dL/d(output)"
        findings.append(Finding(
            kind="vanishing",
            layers=tuple(layer_names),
            severity=severity,
            message=(f"Gradients vanish towards the input: the {what} of {layer_names[0]} is "
                     f"{10 ** (-decades):.1e} of the last layers' ({decades:.1f} orders of magnitude); {cause}."),
            evidence=evidence,
            fixes=fixes,
            reasons=ctx.reasons("vanishing", fixes, acts=", ".join(sat[:4])),
        ))
    elif not any(ctx.types[i] in RECURRENT for i in range(len(names))):
        # the measured decay is short of the threshold, but the weights predict a compound decay of
        # at least that much and the sampled signal confirms it: the cause is visible before the symptom
        compound = causes.vanishing_cause(view, ctx.chain, th.vanishing_decades)
        learning = loss_improvement(view)
        blocked = learning is not None and learning < th.learning_loss_drop
        if compound is not None and (blocked or learning is None):  # a run that learns is not blocked by it
            info = compound.evidence["compound_init"]
            findings.append(Finding(
                kind="vanishing",
                layers=tuple(compound.fix_layers),
                severity="critical" if blocked else "warning",
                message=f"Gradients vanish towards the input: {compound.text}.",
                evidence={"signal": "compound_init", "decades": info["predicted_decades"], **compound.evidence,
                          "fix_layers": compound.fix_layers, "cause": compound.text,
                          "loss_drop": None if learning is None else round(learning, 3),
                          "window_steps": [int(view.steps[0]), int(view.steps[-1])]},
                fixes=compound.fixes,
                reasons=ctx.reasons("vanishing", compound.fixes, acts=""),
            ))
    for name in temporal_flagged:
        if any(name in f.layers for f in findings):
            continue
        info = temporal[name]
        fixes = ("lstm_gru",)
        findings.append(Finding(
            kind="vanishing",
            layers=(name,),
            severity="critical" if info["decades"] >= th.vanishing_critical_decades else "warning",
            message=(f"Gradients vanish through time in {name}: the gradient reaching the first time steps is "
                     f"{10 ** (-info['decades']):.1e} of the one at the last steps ({info['decades']:.1f} orders of magnitude); "
                     "a plain recurrence multiplies the gradient by the same Jacobian at every step."),
            evidence={"signal": "grad_per_time_step", **info},
            fixes=fixes,
            reasons=ctx.reasons("vanishing", fixes),
        ))
    return findings

