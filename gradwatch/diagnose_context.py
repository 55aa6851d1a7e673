"""What every diagnosis rule shares: the per-layer facts derived once per diagnosis, and loss trends."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from gradwatch import causes
from gradwatch.diagnose_depth import nanmedian
from gradwatch.history import HistoryView
from gradwatch.metrics import SIGNAL
from gradwatch.thresholds import Thresholds

#: layers left out of depth comparisons: sparse row updates make their ratios small by design
EXCLUDED_FROM_DEPTH = ("Embedding", "EmbeddingBag")
RECURRENT = ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell")


class RuleContext:
    """Derived per-layer facts the rules share (computed once per diagnosis).

    Args:
        view: the window diagnosed.
        th: the thresholds.
        reasons: ``reasons(kind, fixes, **fmt)``, the sentence saying why each fix treats ``kind``.
    """

    def __init__(self, view: HistoryView, th: Thresholds, reasons: Callable[..., tuple[str, ...]]):
        self.view = view
        self.th = th
        self.reasons = reasons
        self.notes: list[str] = []
        n = len(view.layers)
        self.types = [m.type_name for m in view.layer_meta]
        gtw = view.metric("grad_to_weight").astype(np.float64) if len(view.steps) else np.zeros((0, n))
        gnorm = view.metric("grad_norm").astype(np.float64) if len(view.steps) else np.zeros((0, n))
        gtw = np.where(gnorm > 0, gtw, np.nan)  # exactly-zero gradient = no gradient, not vanishing
        self.gtw = gtw
        self.gnorm = gnorm
        wn = view.metric("weight_norm").astype(np.float64) if len(view.steps) else np.zeros((0, n))
        self.weight_norm = np.array([last_finite(wn[:, i]) for i in range(n)]) if n else np.zeros(0)
        self.matrix = np.array([
            (m.fan_in is not None or m.type_name == "") and m.type_name not in EXCLUDED_FROM_DEPTH
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
        self.gtw_median = nanmedian(gtw, axis=0) if len(view.steps) else np.full(n, np.nan)
        self.signal_in = nanmedian(view.signal[:, :, SIGNAL["out_grad_rms"]], axis=0) if len(view.sample_steps) else np.full(n, np.nan)
        self.act_rms = nanmedian(view.signal[:, :, SIGNAL["act_rms"]], axis=0) if len(view.sample_steps) else np.full(n, np.nan)
        last_w = view.last_weight_norm if view.last_weight_norm is not None and len(view.last_weight_norm) == n else None
        chain_w = np.where(np.isfinite(self.weight_norm), self.weight_norm, last_w) if last_w is not None else self.weight_norm
        self.chain = causes.build_chain(view, chain_w)  # variance gains along depth (causes that compound)

    def hidden_saturating(self) -> list[str]:
        return [
            name for name, m in zip(self.view.activations, self.view.activation_meta, strict=True)
            if m.kind in ("sigmoid", "tanh", "hard") and not m.is_output
        ]


def loss_improvement(view: HistoryView) -> float | None:
    """Relative drop of the loss from the run's start to the recent window (None when unknown)."""
    start = view.initial_loss
    loss = view.loss[np.isfinite(view.loss)] if len(view.loss) else view.loss
    if start is None or not math.isfinite(start) or start <= 0 or not len(loss):
        return None
    recent = float(np.median(loss[-max(1, len(loss) // 4):]))
    return (start - recent) / start


def window_loss_drop(view: HistoryView) -> float | None:
    """Relative drop of the loss within the window, first quarter to last (None when unknown)."""
    loss = view.loss[np.isfinite(view.loss)] if len(view.loss) else view.loss
    if len(loss) < 8:
        return None
    q = len(loss) // 4
    first = float(np.median(loss[:q]))
    return (first - float(np.median(loss[-q:]))) / first if first > 0 else None


def last_finite(col: np.ndarray) -> float:
    finite = np.flatnonzero(np.isfinite(col))
    return float(col[finite[-1]]) if len(finite) else math.nan


def fmt(x: float) -> str:
    """Three significant digits, ``nan`` when not finite."""
    return "nan" if x is None or not math.isfinite(x) else f"{x:.3g}"

