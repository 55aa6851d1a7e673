"""Exploding gradients: gradients far larger than their weights, growth across depth or over steps,
a forward signal growing with depth, or an explosion earlier in the run (peaks kept by the history).

The fixes follow the cause: a recurrence, a compound init gain or residual growth, over-scaled
weights (re-initialise; clipping only masks it under Adam), else large updates (clip, lower the LR).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch import causes
from gradwatch.diagnose_context import RECURRENT, RuleContext, fmt, loss_improvement, window_loss_drop
from gradwatch.diagnose_depth import depth_decay, log10_or_nan, per_step_decay, spearman
from gradwatch.findings import Finding


def exploding_findings(ctx: RuleContext) -> list[Finding]:
    view, th = ctx.view, ctx.th
    if len(view.steps) < th.min_steps:
        return []
    names = view.layers
    reasons_found: list[str] = []
    flagged: set[int] = set()
    evidence: dict[str, Any] = {}
    critical = False

    # (a) gradient far larger than the weights it updates, sustained
    big = ctx.gtw >= th.exploding_grad_to_weight
    share = big.mean(axis=0) if len(ctx.gtw) else np.zeros(len(names))
    for i in range(len(names)):
        if share[i] < th.persistence:
            continue
        if ctx.near_zero[i]:
            continue  # near-zero weights: a large ratio by construction
        flagged.add(i)
    if flagged:
        worst = max(flagged, key=lambda i: ctx.gtw_median[i])
        reasons_found.append(f"grad-to-weight ratio up to {fmt(ctx.gtw_median[worst])} in {names[worst]}")
        evidence["grad_to_weight"] = {names[i]: float(ctx.gtw_median[i]) for i in sorted(flagged)}
        critical |= ctx.gtw_median[worst] >= th.exploding_critical_grad_to_weight

    # (b) growth towards the input across depth
    cols = np.flatnonzero(ctx.matrix)
    if len(cols) >= th.min_depth_layers:
        logs = log10_or_nan(ctx.gtw[:, cols])
        holds = per_step_decay(logs, th.min_depth_layers, th.exploding_depth_decades, th.min_rank_correlation, sign=-1.0)
        r = depth_decay(-log10_or_nan(ctx.gtw_median[cols]), th.min_depth_layers)
        if holds.mean() >= th.persistence and r is not None and r[0] >= th.exploding_depth_decades:
            q = max(1, len(cols) // 4)
            flagged.update(int(c) for c in cols[:q])
            reasons_found.append(f"gradients grow {r[0]:.1f} orders of magnitude towards the input")
            evidence["depth_growth_decades"] = round(float(r[0]), 2)

    # (c) growth over steps
    tn = view.total_norm[np.isfinite(view.total_norm) & (view.total_norm > 0)]
    if len(tn) >= max(th.min_steps, 8):
        q = max(2, len(tn) // 4)
        growth = math.log10(float(np.median(tn[-q:])) / float(np.median(tn[:q])))
        rho = spearman(np.arange(len(tn), dtype=float), tn)
        if growth >= th.exploding_growth_decades and rho >= 0.7:
            reasons_found.append(f"the total gradient norm grew {growth:.1f} orders of magnitude over the window")
            evidence["growth_over_steps_decades"] = round(growth, 2)
            critical = True
            if not flagged:
                flagged.update(range(len(names)))

    # (d) forward signal growing with depth
    fwd = log10_or_nan(ctx.act_rms)
    r = depth_decay(fwd, th.min_depth_layers) if len(view.sample_steps) else None  # late minus early
    if r is not None and r[0] >= th.forward_growth_decades and r[1] >= th.min_rank_correlation:
        reasons_found.append(f"the forward signal grows {r[0]:.1f} orders of magnitude from the first to the last layer")
        evidence["forward_growth_decades"] = round(float(r[0]), 2)
        valid = [i for i in range(len(names)) if math.isfinite(fwd[i])]
        if not flagged:
            flagged.update(valid)

    # (e) an explosion earlier in the run, out of the window now. Measured update ratios decide when
    # there are any (one optimizer step that moved a layer by more than its own size is an explosion,
    # whatever the optimizer; a clipped or Adam-normalised step is not); without them, the raw
    # gradient: its grad-to-weight peak times an SGD learning rate, or a peak >= the critical ratio
    # that left the layer silent (or happened under an optimizer that follows gradient scale).
    peak = view.peak_grad_to_weight
    upd = view.peak_update_ratio
    if peak is not None and len(peak) == len(names) and len(view.steps):
        scale_invariant_opt = view.context.get("optimizer_scale_invariant") is True
        lr = view.context.get("lr")
        silent_now = ~(ctx.gnorm[-max(1, len(ctx.gnorm) // 4):] > 0).any(axis=0)
        learning = loss_improvement(view)
        still = window_loss_drop(view)  # a run recovering now (e.g. after a fix) is not stuck
        for i in range(len(names)):
            if i in flagged:
                continue
            m = view.layer_meta[i]
            step = -1
            # under Adam a huge gradient is no wreck by itself (the update stays small); in a recurrent
            # layer whose run has not learnt since, it is the recurrence's own amplification (a chaotic W_hh)
            stuck_recurrent = (m.recurrent and learning is not None and learning < th.learning_loss_drop
                               and still is not None and still < th.learning_loss_drop
                               and math.isfinite(peak[i]) and peak[i] >= th.exploding_critical_grad_to_weight)
            if upd is not None and len(upd) == len(names) and math.isfinite(upd[i]) and not stuck_recurrent:
                if upd[i] < th.exploding_update_ratio:
                    continue
                step = int(view.peak_update_step[i]) if view.peak_update_step is not None else -1
                why = f"the optimizer step at {step} moved {names[i]} by {upd[i]:.3g}x its own size"
                value = float(upd[i])
            else:
                if not math.isfinite(peak[i]):
                    continue
                if ctx.near_zero[i]:
                    continue
                sgd_step = (not scale_invariant_opt) and isinstance(lr, int | float) and peak[i] * lr >= th.exploding_update_ratio
                big = peak[i] >= th.exploding_critical_grad_to_weight and (
                    silent_now[i] or not scale_invariant_opt or stuck_recurrent)
                if not (sgd_step or big):
                    continue
                step = int(view.peak_step[i]) if view.peak_step is not None else -1
                why = f"at step {step} the gradient of {names[i]} was {peak[i]:.3g}x its weights"
                value = float(peak[i])
            flagged.add(i)
            critical = critical or not stuck_recurrent  # a peak long ago in a stuck recurrence: a warning
            reasons_found.append(why + (" and the layer has had no gradient since" if silent_now[i] else ""))
            evidence.setdefault("early_explosion", {})[names[i]] = {"value": value, "step": step,
                                                                   "silent_now": bool(silent_now[i])}

    if not reasons_found:
        return []
    layers = [names[i] for i in sorted(flagged)]
    scales = [float(ctx.he_scale[i]) for i in sorted(flagged) if math.isfinite(ctx.he_scale[i])]
    over = [names[i] for i in sorted(flagged) if math.isfinite(ctx.he_scale[i]) and ctx.he_scale[i] >= th.over_scaled_init]
    if over:  # every over-scaled layer is part of the cause, flagged or not
        evidence["fix_layers"] = [n for i, n in enumerate(names)
                                  if ctx.matrix[i] and math.isfinite(ctx.he_scale[i]) and ctx.he_scale[i] >= th.over_scaled_init]
    scale_invariant = view.context.get("optimizer_scale_invariant")
    recurrent = [n for n, t in zip(names, ctx.types, strict=True) if t in RECURRENT and n in layers]
    compound = None if recurrent else causes.exploding_cause(view, ctx.chain, th)
    if recurrent:
        # the recurrence amplifies through time: under SGD clipping bounds the updates (Pascanu et al.);
        # under Adam-like optimizers clipping does nothing, the recurrent matrix is re-initialised
        fixes: tuple[str, ...] = causes.recurrent_exploding_fixes(scale_invariant)
        cause = f"the recurrence in {recurrent} amplifies gradients through time"
        evidence["fix_layers"] = recurrent
    elif compound is not None and (compound.fixes[0] == "rescale_residual" or not over):
        fixes, cause = compound.fixes, compound.text
        evidence["fix_layers"] = compound.fix_layers
        evidence.update(compound.evidence)
    elif over:
        fixes = ("he_init", "insert_batchnorm", "lower_lr")
        if scale_invariant is False:
            fixes = ("he_init", "insert_batchnorm", "clip_gradients", "lower_lr")
        cause = f"weights of {evidence['fix_layers'][:3]}{'...' if len(evidence['fix_layers']) > 3 else ''} are {max(scales):.1f}x the He scale"
    else:
        fixes = ("clip_gradients", "lower_lr") if scale_invariant is not True else ("lower_lr", "clip_gradients")
        cause = "updates are large relative to the weights"
    tnp = view.total_norm[np.isfinite(view.total_norm)]
    if len(tnp):
        evidence["total_norm_percentiles"] = {f"p{p}": float(np.percentile(tnp, p)) for p in (10, 50, 90)}
    evidence["he_scale"] = {names[i]: float(ctx.he_scale[i]) for i in sorted(flagged) if math.isfinite(ctx.he_scale[i])}
    evidence["optimizer_scale_invariant"] = scale_invariant
    evidence["cause"] = cause
    evidence["window_steps"] = [int(view.steps[0]), int(view.steps[-1])]
    return [Finding(
        kind="exploding",
        layers=tuple(layers),
        severity="critical" if critical else "warning",
        message=f"Gradients explode: {'; '.join(reasons_found)}; {cause}.",
        evidence=evidence,
        fixes=fixes,
        reasons=ctx.reasons("exploding", fixes, scale=max(scales) if scales else float("nan")),
    )]

