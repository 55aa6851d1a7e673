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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradwatch import causes, provenance
from gradwatch.findings import Diagnosis, Finding, LayerRow
from gradwatch.fixes.registry import fix_reason
from gradwatch.history import HistoryView
from gradwatch.precision import underflow_findings
from gradwatch.spikes import spike_findings
from gradwatch.thresholds import Thresholds

_EXCLUDED_FROM_DEPTH = ("Embedding", "EmbeddingBag")
_RECURRENT = ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell")


def _nanmedian(a: np.ndarray, axis: int | None = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=axis)


def _log10(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(a.astype(np.float64))
    out[~np.isfinite(out)] = np.nan
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3:
        return 0.0
    rx = np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)
    ry = np.argsort(np.argsort(y, kind="stable"), kind="stable").astype(float)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def _decay_once(vals: np.ndarray, idx: np.ndarray) -> tuple[float, float, float]:
    q = max(1, len(vals) // 4)
    late = float(np.median(vals[-q:]))
    early = float(np.median(vals[:q]))
    return late - early, _spearman(idx.astype(float), vals), late


def depth_decay(logs: np.ndarray, min_layers: int) -> tuple[float, float, np.ndarray] | None:
    """How many decades the early layers sit below the late ones, robust to one odd layer at either end.

    Args:
        logs: log10 values per layer in depth order (NaN = no data).
        min_layers: minimum number of layers with data.

    Returns:
        ``(decades, rank_correlation, late_reference)`` or ``None`` without enough layers, where
        ``decades`` = median of the last quarter (at least one layer) minus median of the first
        quarter, and the rank correlation is between depth and value. Decay across depth is a
        trend over many layers: the result is the weakest of the profile as is, without its last
        layer and without its first (a classifier head with near-zero init, or one odd input
        projection, is one jump, not a decay), so no finding hinges on a single layer.
    """
    idx = np.flatnonzero(np.isfinite(logs))
    min_layers = max(1, min_layers)  # Thresholds allows 0; comparing needs at least one layer with data
    if len(idx) < min_layers:
        return None
    vals = logs[idx]
    variants = [_decay_once(vals, idx)]
    if len(idx) > min_layers:
        variants.append(_decay_once(vals[:-1], idx[:-1]))
        variants.append(_decay_once(vals[1:], idx[1:]))
    decades = min(v[0] for v in variants)
    rho = min(v[1] for v in variants)
    return decades, rho, np.array(variants[0][2])


def _per_step_decay(logs: np.ndarray, min_layers: int, decades: float, min_rho: float, sign: float = 1.0) -> np.ndarray:
    """Boolean per step: the depth decay (``sign=1``) or growth (``sign=-1``) condition holds.

    Same decision as :func:`depth_decay` step by step, vectorised over the steps that share one
    pattern of layers with data (usually all of them): a diagnosis looks at hundreds of steps."""
    logs = sign * np.asarray(logs, dtype=np.float64)
    out = np.zeros(logs.shape[0], dtype=bool)
    if logs.size == 0:
        return out
    finite = np.isfinite(logs)
    patterns, which = np.unique(finite, axis=0, return_inverse=True)
    for p, mask in enumerate(patterns):
        rows = np.flatnonzero(which.reshape(-1) == p)
        idx = np.flatnonzero(mask)
        if len(idx) < max(1, min_layers):
            continue
        vals = logs[np.ix_(rows, idx)]
        variants = [_decay_rows(vals)]
        if len(idx) > max(1, min_layers):
            variants += [_decay_rows(vals[:, :-1]), _decay_rows(vals[:, 1:])]
        dec = np.min([v[0] for v in variants], axis=0)
        rho = np.min([v[1] for v in variants], axis=0)
        out[rows] = (dec >= decades) & (rho >= min_rho)
    return out


def _decay_rows(vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise ``_decay_once`` (decades, rank correlation with depth) of a (steps, layers) block."""
    k = vals.shape[1]
    q = max(1, k // 4)
    dec = np.median(vals[:, -q:], axis=1) - np.median(vals[:, :q], axis=1)
    if k < 3:
        return dec, np.zeros(len(vals))
    rx = np.arange(k, dtype=float)  # depth indices are increasing: their ranks are 0..k-1
    ry = np.argsort(np.argsort(vals, axis=1, kind="stable"), axis=1, kind="stable").astype(float)
    rx -= rx.mean()
    ry -= ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx**2).sum() * (ry**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(denom > 0, (rx * ry).sum(axis=1) / denom, 0.0)
    return dec, rho


class _Context:
    """Derived per-layer facts the rules share (computed once per diagnosis)."""

    def __init__(self, view: HistoryView, th: Thresholds):
        self.view = view
        self.th = th
        self.notes: list[str] = []
        n = len(view.layers)
        self.types = [m.type_name for m in view.layer_meta]
        gtw = view.metric("grad_to_weight").astype(np.float64) if len(view.steps) else np.zeros((0, n))
        gnorm = view.metric("grad_norm").astype(np.float64) if len(view.steps) else np.zeros((0, n))
        gtw = np.where(gnorm > 0, gtw, np.nan)  # exactly-zero gradient = no gradient, not vanishing
        self.gtw = gtw
        self.gnorm = gnorm
        wn = view.metric("weight_norm").astype(np.float64) if len(view.steps) else np.zeros((0, n))
        self.weight_norm = np.array([_last_finite(wn[:, i]) for i in range(n)]) if n else np.zeros(0)
        self.matrix = np.array([
            (m.fan_in is not None or m.type_name == "") and m.type_name not in _EXCLUDED_FROM_DEPTH
            for m in view.layer_meta
        ], dtype=bool)
        # weight RMS relative to init scales (He: sqrt(2/fan_in); default/Xavier-ish: 1/sqrt(fan_in))
        self.he_scale = np.full(n, np.nan)
        for i, m in enumerate(view.layer_meta):
            if m.fan_in and m.numel and math.isfinite(self.weight_norm[i]):
                rms = self.weight_norm[i] / math.sqrt(m.numel)
                self.he_scale[i] = rms / math.sqrt(2.0 / m.fan_in)
        # near-zero parameters make a large grad-to-weight ratio by construction: matrices far below
        # their init scale, and layers with no fan-in (biases, norm offsets: zero-initialised, their
        # natural scale is a gain's 1) whose RMS is below the same fraction of it
        self.near_zero = np.zeros(n, dtype=bool)
        for i, m in enumerate(view.layer_meta):
            if m.fan_in:
                self.near_zero[i] = bool(math.isfinite(self.he_scale[i]) and self.he_scale[i] < th.small_weight_factor / math.sqrt(2.0))
            elif m.numel and math.isfinite(self.weight_norm[i]):
                self.near_zero[i] = self.weight_norm[i] / math.sqrt(m.numel) < th.small_weight_factor
        self.gtw_median = _nanmedian(gtw, axis=0) if len(view.steps) else np.full(n, np.nan)
        self.signal_in = _nanmedian(view.signal[:, :, 1], axis=0) if len(view.sample_steps) else np.full(n, np.nan)
        self.act_rms = _nanmedian(view.signal[:, :, 0], axis=0) if len(view.sample_steps) else np.full(n, np.nan)
        last_w = view.last_weight_norm if view.last_weight_norm is not None and len(view.last_weight_norm) == n else None
        chain_w = np.where(np.isfinite(self.weight_norm), self.weight_norm, last_w) if last_w is not None else self.weight_norm
        self.chain = causes.build_chain(view, chain_w)  # variance gains along depth (causes that compound)

    def hidden_saturating(self) -> list[str]:
        return [
            name for name, m in zip(self.view.activations, self.view.activation_meta, strict=True)
            if m.kind in ("sigmoid", "tanh", "hard") and not m.is_output
        ]


def _loss_improvement(view: HistoryView) -> float | None:
    """Relative drop of the loss from the run's start to the recent window (None when unknown)."""
    start = view.initial_loss
    loss = view.loss[np.isfinite(view.loss)] if len(view.loss) else view.loss
    if start is None or not math.isfinite(start) or start <= 0 or not len(loss):
        return None
    recent = float(np.median(loss[-max(1, len(loss) // 4):]))
    return (start - recent) / start


def _window_loss_drop(view: HistoryView) -> float | None:
    """Relative drop of the loss within the window, first quarter to last (None when unknown)."""
    loss = view.loss[np.isfinite(view.loss)] if len(view.loss) else view.loss
    if len(loss) < 8:
        return None
    q = len(loss) // 4
    first = float(np.median(loss[:q]))
    return (first - float(np.median(loss[-q:]))) / first if first > 0 else None


def _last_finite(col: np.ndarray) -> float:
    finite = np.flatnonzero(np.isfinite(col))
    return float(col[finite[-1]]) if len(finite) else math.nan


def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _reasons(kind: str, fixes: Sequence[str], **fmt: Any) -> tuple[str, ...]:
    out = []
    for f in fixes:
        text = fix_reason(kind, f)
        try:
            out.append(text.format(**fmt))
        except (KeyError, ValueError):
            out.append(text)
    return tuple(out)


# -- rules ---------------------------------------------------------------------------------------
def _vanishing(ctx: _Context) -> list[Finding]:
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
        logs = _log10(ctx.gtw[:, cols])
        holds = _per_step_decay(logs, th.min_depth_layers, th.vanishing_decades, th.min_rank_correlation)
        profile = _log10(ctx.gtw_median[cols])
        r = depth_decay(profile, th.min_depth_layers)
        if holds.mean() >= th.persistence and r is not None and r[0] >= th.vanishing_decades:
            decades, signal_used = r[0], "grad_to_weight"
            late = float(r[2])
            flagged = [int(cols[i]) for i in range(len(cols)) if math.isfinite(profile[i]) and profile[i] <= late - th.vanishing_decades]
            evidence["steps_holding"] = float(holds.mean())

    # (b) backward signal dL/d(output) across depth (sampled steps)
    if signal_used is None and len(view.sample_steps) >= 1:
        logs = _log10(view.signal[:, :, 1])
        valid_cols = np.flatnonzero(np.isfinite(logs).any(axis=0))
        if len(valid_cols) >= th.min_depth_layers:
            holds = _per_step_decay(logs[:, valid_cols], th.min_depth_layers, th.vanishing_decades, th.min_rank_correlation)
            profile = _log10(ctx.signal_in[valid_cols])
            r = depth_decay(profile, th.min_depth_layers)
            if holds.mean() >= th.persistence and r is not None and r[0] >= th.vanishing_decades:
                decades, signal_used = r[0], "out_grad_rms"
                late = float(r[2])
                flagged = [int(valid_cols[i]) for i in range(len(valid_cols)) if math.isfinite(profile[i]) and profile[i] <= late - th.vanishing_decades]
                evidence["samples_holding"] = float(holds.mean())

    # (c) through time (recurrent layers): dL/dx_t at the first steps vs the last steps
    temporal: dict[str, dict[str, Any]] = {}
    if len(view.sample_steps) and view.signal.shape[2] > 2:
        tdec = view.signal[:, :, 2].astype(np.float64)
        for i, name in enumerate(names):
            col = tdec[:, i][np.isfinite(tdec[:, i])]
            if not len(col) or float(np.median(col)) < th.vanishing_decades:
                continue
            decades_t = round(float(np.median(col)), 2)
            learning = _loss_improvement(view)
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
        first, last_i = flagged[0], max(i for i in range(len(names)) if math.isfinite(ctx.gtw_median[i]) or math.isfinite(ctx.signal_in[i]))
        evidence.update({
            "signal": signal_used,
            "decades": round(decades, 2),
            "ratio_first_to_last": float(10 ** (-decades)),
            "per_layer_grad_to_weight": {names[i]: float(ctx.gtw_median[i]) for i in range(len(names)) if math.isfinite(ctx.gtw_median[i])},
            "per_layer_out_grad_rms": {names[i]: float(ctx.signal_in[i]) for i in range(len(names)) if math.isfinite(ctx.signal_in[i])},
            "window_steps": [int(view.steps[0]), int(view.steps[-1])],
        })
        sat = ctx.hidden_saturating()
        recurrent = [names[i] for i in flagged if ctx.types[i] in _RECURRENT]
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
        learning = _loss_improvement(view)
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
            reasons=_reasons("vanishing", fixes, acts=", ".join(sat[:4])),
        ))
        _ = first, last_i
    elif not any(ctx.types[i] in _RECURRENT for i in range(len(names))):
        # the measured decay is short of the threshold, but the weights predict a compound decay of
        # at least that much and the sampled signal confirms it: the cause is visible before the symptom
        compound = causes.vanishing_cause(view, ctx.chain, th.vanishing_decades)
        learning = _loss_improvement(view)
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
                reasons=_reasons("vanishing", compound.fixes, acts=""),
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
            reasons=_reasons("vanishing", fixes),
        ))
    return findings


def _exploding(ctx: _Context) -> list[Finding]:
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
        m = view.layer_meta[i]
        if share[i] < th.persistence:
            continue
        if ctx.near_zero[i]:
            continue  # near-zero weights: a large ratio by construction
        flagged.add(i)
    if flagged:
        worst = max(flagged, key=lambda i: ctx.gtw_median[i])
        reasons_found.append(f"grad-to-weight ratio up to {_fmt(ctx.gtw_median[worst])} in {names[worst]}")
        evidence["grad_to_weight"] = {names[i]: float(ctx.gtw_median[i]) for i in sorted(flagged)}
        critical |= ctx.gtw_median[worst] >= th.exploding_critical_grad_to_weight

    # (b) growth towards the input across depth
    cols = np.flatnonzero(ctx.matrix)
    if len(cols) >= th.min_depth_layers:
        logs = _log10(ctx.gtw[:, cols])
        holds = _per_step_decay(logs, th.min_depth_layers, th.exploding_depth_decades, th.min_rank_correlation, sign=-1.0)
        r = depth_decay(-_log10(ctx.gtw_median[cols]), th.min_depth_layers)
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
        rho = _spearman(np.arange(len(tn), dtype=float), tn)
        if growth >= th.exploding_growth_decades and rho >= 0.7:
            reasons_found.append(f"the total gradient norm grew {growth:.1f} orders of magnitude over the window")
            evidence["growth_over_steps_decades"] = round(growth, 2)
            critical = True
            if not flagged:
                flagged.update(range(len(names)))

    # (d) forward signal growing with depth
    fwd = _log10(ctx.act_rms)
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
        learning = _loss_improvement(view)
        still = _window_loss_drop(view)  # a run recovering now (e.g. after a fix) is not stuck
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
    recurrent = [n for n, t in zip(names, ctx.types, strict=True) if t in _RECURRENT and n in layers]
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
        reasons=_reasons("exploding", fixes, scale=max(scales) if scales else float("nan")),
    )]


def _nonfinite(ctx: _Context) -> list[Finding]:
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
        reasons=_reasons("nonfinite", fixes),
    )]


def _activation_findings(ctx: _Context) -> list[Finding]:
    view, th = ctx.view, ctx.th
    if not len(view.sample_steps) or not view.activations:
        return []
    dead = view.act[:, :, 0].astype(np.float64)
    sat = view.act[:, :, 1].astype(np.float64)
    samples = view.act[:, :, 2].astype(np.float64)
    dead = np.where(samples >= th.dead_min_samples, dead, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dead_m = np.nanmin(dead[-5:], axis=0)  # dead in every recent sample, not just unlucky once
    sat_m = _nanmedian(sat, axis=0)
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
            reasons=_reasons("dead_units", fixes),
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
            reasons=_reasons("saturation", fixes),
        ))
    return findings


def _rows(ctx: _Context, findings: list[Finding]) -> tuple[LayerRow, ...]:
    view = ctx.view
    flags: dict[str, list[str]] = {}
    for f in findings:
        for name in f.layers:
            flags.setdefault(name, []).append(f.kind)
    med = _nanmedian(view.grad.astype(np.float64), axis=0) if len(view.steps) else np.full((len(view.layers), 8), np.nan)
    act_m = _nanmedian(view.act.astype(np.float64), axis=0) if len(view.sample_steps) and view.activations else None
    feeding: dict[str, tuple[float, float]] = {}
    if act_m is not None:
        for i, m in enumerate(view.activation_meta):
            if m.feeding_layer:
                feeding[m.feeding_layer] = (float(act_m[i, 0]), float(act_m[i, 1]))
                for f in findings:
                    if view.activations[i] in f.layers:
                        flags.setdefault(m.feeding_layer, []).append(f.kind)
    from gradwatch.collect import G

    rows = []
    for i, name in enumerate(view.layers):
        dead, sat = feeding.get(name, (math.nan, math.nan))
        rows.append(LayerRow(
            name=name,
            kind=view.layer_meta[i].type_name,
            depth=i,
            grad_norm=float(med[i, G["grad_norm"]]),
            grad_mean_abs=float(med[i, G["grad_mean_abs"]]),
            grad_max_abs=float(med[i, G["grad_max_abs"]]),
            grad_to_weight=float(med[i, G["grad_to_weight"]]),
            weight_norm=float(ctx.weight_norm[i]) if len(ctx.weight_norm) else math.nan,
            dead_frac=dead,
            saturated_frac=sat,
            flags=tuple(dict.fromkeys(flags.get(name, []))),
        ))
    return tuple(rows)


_ORDER = {"nonfinite": 0, "exploding": 1, "vanishing": 2, "dead_units": 3, "saturation": 4, "spike": 5, "underflow": 6}


def _spike(ctx: _Context) -> list[Finding]:
    return spike_findings(ctx.view, ctx.th)


def _underflow(ctx: _Context) -> list[Finding]:
    return underflow_findings(ctx.view, ctx.th)


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
        ctx = _Context(view, th)
        findings: list[Finding] = []
        for rule in (_nonfinite, _exploding, _vanishing, _activation_findings, _spike, _underflow):
            try:
                findings.extend(rule(ctx))
            except Exception as exc:  # a rule must never take the training run down
                notes.append(f"rule {rule.__name__.strip('_')} failed on this history: {type(exc).__name__}: {exc}")
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
