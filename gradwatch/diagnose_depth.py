"""The numbers behind the depth rules: decay or growth of a per-layer profile across depth.

Pure numpy, no history: :func:`depth_decay` for one profile, :func:`per_step_decay` for every
step of a window at once, and the small NaN-tolerant helpers the rules share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def nanmedian(a: np.ndarray, axis: int | None = None) -> Any:
    """``np.nanmedian``, NaN for all-NaN slices (they are "not measured") without a warning.

    One sort instead of numpy's masked-array path for small slices, which cost ~0.6 ms a call and ran
    a dozen times per diagnosis (NaNs sort last; the median of the ``n`` finite-or-infinite values is
    the mean of the two middle ones, as in numpy).
    """
    a = np.asarray(a)
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    if axis is None:
        a, axis = a.reshape(-1), 0
    axis = axis % a.ndim
    n = (~np.isnan(a)).sum(axis=axis, keepdims=True)
    if a.shape[axis] == 0:
        return np.full(np.squeeze(n, axis=axis).shape, np.nan, dtype=a.dtype)[()]
    s = np.sort(a, axis=axis)
    lo = np.take_along_axis(s, np.maximum(n - 1, 0) // 2, axis=axis)
    hi = np.take_along_axis(s, np.minimum(n // 2, a.shape[axis] - 1), axis=axis)
    with np.errstate(invalid="ignore", over="ignore"):  # inf, as in numpy, when the two middle ones overflow
        med = (lo + hi) / 2
    med = np.where(n == 0, np.nan, med).astype(a.dtype, copy=False)
    return np.squeeze(med, axis=axis)[()]


def log10_or_nan(a: np.ndarray) -> np.ndarray:
    """float64 ``log10``, NaN where it is not finite (zeros, negatives, NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(a.astype(np.float64))
    out[~np.isfinite(out)] = np.nan
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation (0 for fewer than 3 points or a constant series)."""
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
    return late - early, spearman(idx.astype(float), vals), late


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


def per_step_decay(logs: np.ndarray, min_layers: int, decades: float, min_rho: float, sign: float = 1.0) -> np.ndarray:
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

