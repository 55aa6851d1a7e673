"""Non-finite gradients: the first NaN/Inf step, and its cause from the frozen provenance record.

Under fp16 loss scaling an overflow is the scaler calibrating: only overflows that keep happening
are reported.
"""

from __future__ import annotations

import numpy as np

from gradwatch import provenance
from gradwatch.diagnose_context import RuleContext
from gradwatch.findings import Finding


def nonfinite_findings(ctx: RuleContext) -> list[Finding]:
    view = ctx.view
    if view.first_nonfinite is None:
        return []
    step, layers = view.first_nonfinite
    nf = np.nan_to_num(view.metric("nonfinite")) if len(view.steps) else np.zeros((0, 0))
    recent = nf[-4:].sum(axis=1) > 0 if len(nf) else np.zeros(0, dtype=bool)
    recent_bad = bool(recent.any())
    if view.context.get("amp_loss_scaling"):
        # fp16 loss scaling: an overflowing step is skipped by the scaler and halves the scale, so
        # overflows while the scale calibrates (or at its periodic growth attempts) are harmless;
        # only overflows that keep happening in most of the latest steps are a problem
        if not (len(recent) and recent.mean() >= 0.5):
            return []
    fixes = ("clip_gradients", "lower_lr")
    cause, why = provenance.explain(view.nonfinite_provenance, ctx.th) if view.nonfinite_provenance else (None, "")
    return [Finding(
        kind="nonfinite",
        layers=tuple(layers),
        severity="critical",
        message=(f"Non-finite gradients (NaN/Inf) first appeared at step {step} in {', '.join(layers[:3])}"
                 f"{'...' if len(layers) > 3 else ''}; {view.nonfinite_steps} of {view.total_steps} steps affected."
                 + (f" Cause: {why}." if why else "")),
        evidence={"first_step": int(step), "first_layers": list(layers), "nonfinite_steps": int(view.nonfinite_steps),
                  "total_steps": int(view.total_steps), "still_occurring": recent_bad, "cause": cause,
                  "origin": (view.nonfinite_provenance or {}).get("origin"),
                  "provenance": dict(view.nonfinite_provenance or {})},
        fixes=fixes,
        reasons=ctx.reasons("nonfinite", fixes),
    )]

