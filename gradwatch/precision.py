"""The ``underflow`` rule: fp16 gradients flushing to zero while the loss scale is low.

fp16 represents magnitudes down to about 6e-8; the GradScaler multiplies the loss by its scale so
small gradients stay above that. Every overflow halves the scale, and a run that overflows again and
again (or was started with a low ``init_scale``) can end with a scale so low that small gradients
become exactly zero. The signature, per layer: the fraction of exactly-zero gradient elements has
*risen* (by ``underflow_zero_rise`` over the run's lowest block mean - a ReLU layer's natural zeros
are there from the start and do not count) while the recorded loss scale is at most
``underflow_max_scale``. Needs the loss scale (``watch(scaler=...)``, ``watcher.note_loss_scale`` or
the Lightning callback under ``16-mixed``); without it the rule says nothing.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from gradwatch.findings import Finding
from gradwatch.fixes.registry import fix_reason

if TYPE_CHECKING:
    from gradwatch.history import HistoryView
    from gradwatch.thresholds import Thresholds


def underflow_findings(view: HistoryView, th: Thresholds) -> list[Finding]:
    """The ``underflow`` finding of a view (empty when there is none); pure, no torch."""
    scales = np.asarray(view.loss_scale, dtype=np.float64)
    scales = scales[np.isfinite(scales)]
    if not len(scales) or not len(view.steps) or view.lowest_zero_frac is None:
        return []
    latest = float(scales[-1])
    if latest > th.underflow_max_scale:
        return []
    zf = view.metric("grad_zero_frac").astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        recent = np.nanmedian(zf[-max(1, len(zf) // 4):], axis=0) if np.isfinite(zf[-max(1, len(zf) // 4):]).any() \
            else np.nanmedian(zf, axis=0)
    low = np.asarray(view.lowest_zero_frac, dtype=np.float64)
    rise = recent - low
    hit = np.flatnonzero(np.isfinite(rise) & (rise >= th.underflow_zero_rise))
    if not len(hit):
        return []
    names = [view.layers[i] for i in hit]
    nf = np.nan_to_num(view.metric("nonfinite")) > 0
    overflow_steps = int(nf.any(axis=1).sum())
    worst = float(rise[hit].max())
    fixes = ("mixed_precision",)
    return [Finding(
        kind="underflow",
        layers=tuple(names),
        severity="critical" if worst >= 0.5 else "warning",
        message=(f"fp16 gradient underflow: the loss scale is down to {latest:g} and the share of exactly-zero "
                 f"gradients in {', '.join(names[:3])}{'...' if len(names) > 3 else ''} rose by up to {worst:.0%} "
                 f"over the run's lowest; {overflow_steps} of the window's {len(view.steps)} steps overflowed (skipped)."),
        evidence={"loss_scale": latest, "lowest_loss_scale": float(scales.min()),
                  "zero_frac": {view.layers[i]: round(float(recent[i]), 4) for i in hit},
                  "lowest_zero_frac": {view.layers[i]: round(float(low[i]), 4) for i in hit},
                  "overflow_steps": overflow_steps, "window_steps": [int(view.steps[0]), int(view.steps[-1])]},
        fixes=fixes,
        reasons=tuple(fix_reason("underflow", f) for f in fixes),
    )]
