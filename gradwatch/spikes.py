"""The ``spike`` rule: a layer's gradient norm far above its *own* recent history.

Large-model runs rarely fail like textbook ones: a gradient-norm spike in a few layers (often the
embeddings or the last blocks), a loss spike after it, and again some hundred steps later. The rule
compares every step with a trailing window of the same layer's earlier steps, in log10 units:

* **robust and scale-free**: the baseline is the median of the layer's log norms over the last
  ``spike_baseline`` steps, the spread their MAD (x1.4826, the Gaussian-consistent scale, floored at
  0.05 decades so a very steady layer does not turn every wobble into "many deviations"). Multiplying
  the loss by any constant changes nothing.
* **both large in robust units and large in ratio**: ``spike_z`` deviations *and* ``spike_ratio``
  times the median. Either alone alarms on healthy runs: z alone on very steady layers (full-batch
  runs), ratio alone on intermittent ones. Measured on synthetic 50-layer runs (200 steps of lookback,
  50-step window, 100 windows each): Gaussian log-norm noise of 0.1 or 0.2 decades never alarms;
  Student-t (3 degrees of freedom) log-norm noise alarms in 6% of windows at 0.05 decades and 37% at
  0.1 decades - but such a series does jump 10-100x its median every few hundred steps, which is what
  this finding reports. Real healthy runs (SGD and Adam MLPs, Adam with warm-up, a pre-LN transformer,
  a BatchNorm ResNet; 300 steps, 2 seeds, diagnosed every 50 steps) never alarmed.
* **visible in the total norm**: the step's total norm must also be ``spike_total_ratio`` times its
  own median, so a small, intermittently used layer (a rarely routed expert, a rare token's row)
  cannot alarm on its own.
* **current**: spikes are counted over the window and the lookback before it (``HistoryView.pre_*``),
  but a finding needs one inside the window; the first ``spike_min_baseline`` steps are never judged
  (no baseline yet: Adam's first steps, warm-up's start).

Steps with a non-finite gradient are left to the ``nonfinite`` finding (its provenance tells what
grew before the NaN).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.diagnose_depth import nanmedian
from gradwatch.findings import Finding
from gradwatch.fixes.registry import fix_reason

if TYPE_CHECKING:
    from gradwatch.history import HistoryView
    from gradwatch.thresholds import Thresholds

_MAD_TO_SIGMA = 1.4826
_MAD_FLOOR_DECADES = 0.05
#: steps after a spike within which a loss spike counts as following it
_LOSS_FOLLOW_STEPS = 5


def _log10(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(np.asarray(a, dtype=np.float64))
    out[~np.isfinite(out)] = np.nan
    return out


def robust_baseline(logs: np.ndarray, window: int, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Trailing median and MAD-based spread of ``logs`` (``[steps, series]``), excluding each step itself.

    Returns ``(median, sigma)`` of the same shape, NaN where fewer than ``min_count`` of the previous
    ``window`` values are finite. ``sigma`` is ``1.4826 * MAD`` floored at 0.05 decades.
    """
    logs = np.asarray(logs, dtype=np.float64)
    if logs.ndim == 1:
        m, s = robust_baseline(logs[:, None], window, min_count)
        return m[:, 0], s[:, 0]
    t_len, n = logs.shape
    if t_len == 0:
        return np.zeros((0, n)), np.zeros((0, n))
    padded = np.vstack([np.full((window, n), np.nan), logs[:-1]])  # row t + window - 1 ends at step t - 1
    wins = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)[:t_len]  # (t, n, window)
    count = np.isfinite(wins).sum(axis=-1)
    med = nanmedian(wins, axis=-1)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, not measured
        mad = nanmedian(np.abs(wins - med[..., None]), axis=-1)
    ok = count >= min_count
    med = np.where(ok, med, np.nan)
    sig = np.where(ok, np.maximum(_MAD_TO_SIGMA * mad, _MAD_FLOOR_DECADES), np.nan)
    return med, sig


def _spike_mask(logs: np.ndarray, th: Thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mask, z, decades_above)`` per step and series; only candidates get a baseline computed."""
    t_len, n = logs.shape
    mask = np.zeros((t_len, n), dtype=bool)
    z = np.full((t_len, n), np.nan)
    above = np.full((t_len, n), np.nan)
    r = math.log10(th.spike_ratio)
    # cheap pre-filter: a spike is at least `r` decades above the trailing minimum (min <= median)
    filled = np.where(np.isfinite(logs), logs, np.inf)
    # trailing minimum of the `spike_baseline` steps before each step, for all steps at once
    padded = np.vstack([np.full((th.spike_baseline, n), np.inf), filled])
    lo = np.lib.stride_tricks.sliding_window_view(padded, th.spike_baseline, axis=0)[:t_len].min(axis=-1)
    with np.errstate(invalid="ignore"):
        cand = np.isfinite(logs) & (logs - lo >= r)
    cand[:th.spike_min_baseline] = False
    rows = np.flatnonzero(cand.any(axis=1))
    for t in rows:
        cols = np.flatnonzero(cand[t])
        base = logs[max(0, t - th.spike_baseline):t][:, cols]
        enough = np.isfinite(base).sum(axis=0) >= th.spike_min_baseline
        if not enough.any():
            continue
        cols, base = cols[enough], base[:, enough]
        m = nanmedian(base, axis=0)
        with np.errstate(invalid="ignore"):
            s = np.maximum(_MAD_TO_SIGMA * nanmedian(np.abs(base - m), axis=0), _MAD_FLOOR_DECADES)
        d = logs[t, cols] - m
        zz = d / s
        z[t, cols], above[t, cols] = zz, d
        mask[t, cols] = np.isfinite(zz) & (zz >= th.spike_z) & (d >= r)
    return mask, z, above


def spike_findings(view: HistoryView, th: Thresholds) -> list[Finding]:
    """The ``spike`` finding of a view (empty list when there is none); pure, no torch."""
    n_win = len(view.steps)
    if not n_win or not len(view.layers):
        return []
    gn_win = view.metric("grad_norm").astype(np.float64)
    pre = view.pre_grad_norm if view.pre_grad_norm.shape[1:] == gn_win.shape[1:] else np.zeros((0, gn_win.shape[1]))
    steps = np.concatenate([view.pre_steps[: len(pre)], view.steps]).astype(np.int64)
    gn = np.vstack([pre.astype(np.float64), gn_win])
    tn = np.concatenate([np.asarray(view.pre_total_norm, dtype=np.float64)[: len(pre)], view.total_norm])
    loss = np.concatenate([np.asarray(view.pre_loss, dtype=np.float64)[: len(pre)], view.loss])
    if len(steps) <= th.spike_min_baseline:
        return []
    nf = np.nan_to_num(view.metric("nonfinite")) > 0
    if nf.any():
        return []  # the nonfinite finding (and its provenance) tells this story
    logs = _log10(np.where(gn > 0, gn, np.nan))
    mask, z, above = _spike_mask(logs, th)
    tlogs = _log10(np.where(tn > 0, tn, np.nan))
    tmed, _ = robust_baseline(tlogs, th.spike_baseline, th.spike_min_baseline)
    total_ok = np.isfinite(tmed) & (tlogs - tmed >= math.log10(max(th.spike_total_ratio, 1.0)))
    mask &= total_ok[:, None]
    spike_rows = np.flatnonzero(mask.any(axis=1))
    first_window = len(steps) - n_win
    if not len(spike_rows) or spike_rows[-1] < first_window:
        return []
    names = view.layers
    first = int(spike_rows[0])
    first_layers = [names[i] for i in np.flatnonzero(mask[first])]
    counts = mask.sum(axis=0)
    spiked = [names[i] for i in np.flatnonzero(counts)]
    # did the loss follow? a robust loss spike within a few steps after a gradient spike
    lmed, _ = robust_baseline(loss, th.spike_baseline, th.spike_min_baseline)
    lmad = np.full(len(loss), np.nan)
    for t in spike_rows:
        base = loss[max(0, t - th.spike_baseline):t]
        base = base[np.isfinite(base)]
        if len(base) >= th.spike_min_baseline:
            lmad[t] = max(_MAD_TO_SIGMA * float(np.median(np.abs(base - np.median(base)))), 1e-3 * abs(float(np.median(base))), 1e-12)
    # the loss of the spike step itself is the batch's (an unusual batch); the update's damage shows after it
    loss_followed: int | None = None
    loss_same_step = False
    for t in spike_rows:
        if not math.isfinite(lmad[t]):
            continue
        high = np.isfinite(loss[t:t + _LOSS_FOLLOW_STEPS + 1]) & (loss[t:t + _LOSS_FOLLOW_STEPS + 1] - lmed[t] >= th.spike_z * lmad[t])
        loss_same_step |= bool(high[0])
        hit = np.flatnonzero(high[1:])
        if len(hit) and loss_followed is None:
            loss_followed = int(steps[t + 1 + hit[0]])
    clean = tlogs[np.isfinite(tlogs) & ~mask.any(axis=1)]
    clip_threshold = None
    if len(clean) >= th.spike_min_baseline:
        med = float(np.median(clean))
        sig = max(_MAD_TO_SIGMA * float(np.median(np.abs(clean - med))), _MAD_FLOOR_DECADES)
        clip_threshold = float(10 ** (med + th.spike_z * sig))  # the rule's own "not a spike" bound
    max_ratio = float(10 ** np.nanmax(np.where(mask, above, np.nan)))
    first_ratio = float(10 ** np.nanmax(np.where(mask[first], above[first], np.nan)))
    n_spikes = len(spike_rows)
    recurring = n_spikes >= 3
    evidence: dict[str, Any] = {
        "first_step": int(steps[first]),
        "first_layers": first_layers,
        "spike_steps": [int(steps[t]) for t in spike_rows[:20]],
        "n_spike_steps": int(n_spikes),
        "steps_examined": [int(steps[0]), int(steps[-1])],
        "layers_spiked": {names[i]: int(counts[i]) for i in np.flatnonzero(counts)},
        "max_ratio_to_median": round(max_ratio, 3),
        "max_robust_z": round(float(np.nanmax(np.where(mask, z, np.nan))), 2),
        "loss_followed_at": loss_followed,
        "loss_high_on_spike_step": loss_same_step,
        "recurring": recurring,
        "clip_threshold": clip_threshold,
        "total_norm_history": [float(v) for v in tn[np.isfinite(tn)][-500:]],
        "optimizer_scale_invariant": view.context.get("optimizer_scale_invariant"),
    }
    fixes = ("clip_gradients", "lower_lr", "skip_spikes")
    follow = f"; the loss spiked at step {loss_followed}" if loss_followed is not None else "; the loss did not follow"
    again = f"; {n_spikes} spike steps in steps {int(steps[0])}-{int(steps[-1])}" if n_spikes > 1 else ""
    return [Finding(
        kind="spike",
        layers=tuple(spiked),
        severity="critical" if (loss_followed is not None or recurring or max_ratio >= 1000) else "warning",
        message=(f"Gradient spike: at step {int(steps[first])} the gradient norm of {', '.join(first_layers[:3])}"
                 f"{'...' if len(first_layers) > 3 else ''} jumped to {first_ratio:.3g}x its recent median "
                 f"(>= {th.spike_z:g} robust deviations){follow}{again}."),
        evidence=evidence,
        fixes=fixes,
        reasons=tuple(fix_reason("spike", f) for f in fixes),
    )]
