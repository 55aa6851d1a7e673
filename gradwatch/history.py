"""Bounded columnar store of per-step, per-layer statistics: recording, and reading it back.

Memory is bounded whatever the run length:

- a ring buffer of the most recent ``capacity`` collected steps, ``float32[capacity, layers, 8]``
  for the 8 gradient metrics (``capacity * layers * 32`` bytes, plus ``capacity * 24`` for step numbers,
  total norm and loss), and of the most recent ``sample_capacity`` activation samples
  (``sample_capacity * (activations + layers) * 12`` bytes, plus 16 per sample);
- a long-term summary of at most ``summary_slots`` blocks covering the whole run: each block
  holds the sum and count of every metric over its steps (float64: ``summary_slots * layers * 128``
  bytes); when the slots are full, neighbouring blocks are merged pairwise, in place, and the block
  length doubles, so the summary spans any run length.

All of it is allocated when layers are registered (``History.nbytes``) and does not grow with the
run. With the defaults (1000 steps, 200 samples, 256 summary slots) a 500-layer model with 500
activation modules holds 16 MB of gradient history, 2.4 MB of samples and 16.4 MB of summary:
34.8 MB in all.

The buffers live in :mod:`gradwatch.history_buffers`, the window the diagnosis reads in
:mod:`gradwatch.history_view`, checkpointing in :mod:`gradwatch.history_state`; metric columns
follow :mod:`gradwatch.metrics`.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any

import numpy as np
import pandas as pd

from gradwatch import provenance
from gradwatch.history_buffers import BlockSummary, RingBuffer
from gradwatch.history_state import HistoryCheckpoint
from gradwatch.history_view import LAST_SIGNAL_METRICS, ActivationMeta, HistoryView, LayerMeta
from gradwatch.metrics import ACT_METRICS, GRAD, GRAD_METRICS, LAYER_SIGNAL_METRICS, SIGNAL

_NONFINITE = GRAD["nonfinite"]
_GN = GRAD["grad_norm"]
_ZF = GRAD["grad_zero_frac"]
_GTW = GRAD["grad_to_weight"]
_UPD = GRAD["update_ratio"]
_WN = GRAD["weight_norm"]
_LAST_SIGNAL = [SIGNAL[m] for m in LAST_SIGNAL_METRICS]
#: steps recorded in one batch may follow the first non-finite one: look back past them
_RECORD_SLACK = 64


class History(HistoryCheckpoint):
    """Per-layer statistics of a run: recent steps in full, the whole run in summary.

    Args:
        capacity: number of recent collected steps kept in full.
        sample_capacity: number of recent activation samples kept.
        summary_slots: number of long-term summary blocks.
    """

    def __init__(self, capacity: int = 1000, sample_capacity: int = 200, summary_slots: int = 256):
        for name, value in (("capacity", capacity), ("sample_capacity", sample_capacity), ("summary_slots", summary_slots)):
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"History {name} must be an integer >= 2, got {value!r}")
        self.layers: list[str] = []
        self.layer_meta: dict[str, LayerMeta] = {}
        self.activations: list[str] = []
        self.activation_meta: dict[str, ActivationMeta] = {}
        self._grad = RingBuffer(capacity, (0, len(GRAD_METRICS)))
        self._scalars = RingBuffer(capacity, (2,))  # total_norm, loss
        self._act = RingBuffer(sample_capacity, (0, len(ACT_METRICS)))
        self._signal = RingBuffer(sample_capacity, (0, len(LAYER_SIGNAL_METRICS)))
        self._summary = BlockSummary(summary_slots, (0, len(GRAD_METRICS)))
        self.first_nonfinite: tuple[int, list[str]] | None = None
        self.nonfinite_provenance: dict[str, Any] | None = None
        #: (step, scale) of the AMP loss scale, as recorded (bounded like the recent window)
        self.loss_scales: deque[tuple[int, float]] = deque(maxlen=capacity)
        self._peak = np.zeros(0)
        self._peak_upd = np.zeros(0)
        self._peak_upd_step = np.zeros(0, dtype=np.int64)
        self._last_wnorm = np.zeros(0)
        self._last_signal = np.zeros((0, len(LAST_SIGNAL_METRICS)))
        self._fan_numel: tuple[np.ndarray, np.ndarray] | None = None
        self._first_losses: list[float] = []
        self._columns_cache: tuple[list[int], int, int, bool] | None = None
        self._peak_step = np.zeros(0, dtype=np.int64)
        self.nonfinite_steps = 0
        self.total_steps = 0
        self.context: dict[str, Any] = {}

    # -- registration ----------------------------------------------------------------------------
    def register_layers(self, names: list[str], meta: list[LayerMeta]) -> list[int]:
        """Make sure each layer has a column; returns their column indices (new layers appended)."""
        for name, m in zip(names, meta, strict=True):
            if name not in self.layer_meta:
                self.layers.append(name)
            self.layer_meta[name] = m
        n = len(self.layers)
        self._grad.grow(n)
        self._signal.grow(n)
        self._summary.grow(n)
        if len(self._peak) < n:
            extra = n - len(self._peak)
            self._peak = np.concatenate([self._peak, np.full(extra, np.nan)])
            self._peak_step = np.concatenate([self._peak_step, np.zeros(extra, dtype=np.int64)])
            self._peak_upd = np.concatenate([self._peak_upd, np.full(extra, np.nan)])
            self._peak_upd_step = np.concatenate([self._peak_upd_step, np.zeros(extra, dtype=np.int64)])
            self._last_wnorm = np.concatenate([self._last_wnorm, np.full(extra, np.nan)])
            self._last_signal = np.concatenate([self._last_signal, np.full((extra, len(LAST_SIGNAL_METRICS)), np.nan)])
        self._active_layers = set(names)
        self._fan_numel = None  # layer metadata may have changed
        index = {name: i for i, name in enumerate(self.layers)}
        return [index[name] for name in names]

    def register_activations(self, names: list[str], meta: list[ActivationMeta]) -> list[int]:
        for name, m in zip(names, meta, strict=True):
            if name not in self.activation_meta:
                self.activations.append(name)
            self.activation_meta[name] = m
        self._act.grow(len(self.activations))
        self._active_activations = set(names)
        index = {name: i for i, name in enumerate(self.activations)}
        return [index[name] for name in names]

    # -- appending -------------------------------------------------------------------------------
    def append_step(
        self, step: int, columns: list[int], values: np.ndarray, total_norm: float, loss: float = math.nan
    ) -> None:
        """Record one collected step: ``values[i]`` (GRAD_METRICS order) belongs to column ``columns[i]``."""
        with np.errstate(over="ignore"):  # beyond float32's range a statistic is stored as inf
            if self._identity_columns(columns):
                record = values.astype(np.float32)  # the usual case: one row per layer, in column order
            else:
                record = np.full((len(self.layers), len(GRAD_METRICS)), np.nan, dtype=np.float32)
                record[columns] = values
            scalars = np.array([total_norm, loss], dtype=np.float32)
        self._grad.append(step, record)
        self._scalars.append(step, scalars)
        self._summary.add(step, record)
        if math.isfinite(loss) and len(self._first_losses) < 10:
            self._first_losses.append(float(loss))
        gtw = record[:, _GTW]  # float32, compared with the float64 peaks exactly
        higher = np.isfinite(gtw) & ~(gtw <= self._peak)  # NaN peaks are replaced by any finite value
        self._peak[higher] = gtw[higher]
        self._peak_step[higher] = step
        self._track_update_peaks(step, record)
        self.total_steps += 1
        nf = values[:, _NONFINITE] > 0  # NaN (not measured) is not > 0
        if nf.any():
            self.nonfinite_steps += 1
            if self.first_nonfinite is None:
                self.first_nonfinite = (step, [self.layers[columns[i]] for i in np.flatnonzero(nf)])
                self._capture_provenance()

    def append_steps(
        self, steps: list[int], columns: list[int], values: np.ndarray, total_norms: list[float], losses: list[float]
    ) -> None:
        """Record several collected steps at once (``values[k]`` is step ``k``'s ``append_step`` values):
        the same history as appending them one by one, with whole-batch array operations."""
        k = len(steps)
        n = len(self.layers)
        if k < 2 or not self._identity_columns(columns) or values.shape[1:] != (n, len(GRAD_METRICS)) \
                or self._grad.data.shape[1] != n:
            for s, v, t, loss in zip(steps, values, total_norms, losses, strict=True):
                self.append_step(s, columns, v, t, loss)
            return
        step_arr = np.asarray(steps, dtype=np.int64)
        with np.errstate(over="ignore"):  # beyond float32's range a statistic is stored as inf
            records = values.astype(np.float32)
            scalars = np.ascontiguousarray(np.array([total_norms, losses], dtype=np.float32).T)
        self._grad.extend(step_arr, records)
        self._scalars.extend(step_arr, scalars)
        for s, record in zip(steps, records, strict=True):
            self._summary.add(s, record)
        for loss in losses:
            if len(self._first_losses) >= 10:
                break
            if math.isfinite(loss):
                self._first_losses.append(float(loss))
        gtw = records[:, :, _GTW]
        finite = np.isfinite(gtw)
        masked = np.where(finite, gtw, -np.inf)
        best, at = masked.max(axis=0), masked.argmax(axis=0)  # the first step reaching each layer's maximum
        higher = finite.any(axis=0) & ~(best <= self._peak[:n])
        self._peak[:n][higher] = best[higher]
        self._peak_step[:n][higher] = step_arr[at[higher]]
        if np.isfinite(records[:, :, _UPD]).any() or np.isfinite(records[:, :, _WN]).any():
            for s, record in zip(steps, records, strict=True):
                self._track_update_peaks(s, record)
        self.total_steps += k
        nf = values[:, :, _NONFINITE] > 0
        if nf.any():
            for s, row in zip(steps, nf, strict=True):
                if row.any():
                    self.nonfinite_steps += 1
                    if self.first_nonfinite is None:
                        self.first_nonfinite = (s, [self.layers[columns[i]] for i in np.flatnonzero(row)])
                        self._capture_provenance()

    def record_loss_scale(self, step: int, scale: float) -> None:
        """Keep the AMP loss scale in force at ``step`` (the latest is also ``context["loss_scale"]``)."""
        self.loss_scales.append((int(step), float(scale)))
        self.context["loss_scale"] = float(scale)

    def _capture_provenance(self) -> None:
        """Freeze the evidence before the first non-finite step (once per run; never raises)."""
        try:
            step, layers = self.first_nonfinite  # type: ignore[misc]
            view = self.view(last=provenance.LOOKBACK + _RECORD_SLACK)
            self.nonfinite_provenance = provenance.capture(view, step, layers)
        except Exception as exc:  # evidence is a bonus: recording must go on
            self.nonfinite_provenance = {"step": self.first_nonfinite[0] if self.first_nonfinite else None,
                                         "error": f"{type(exc).__name__}: {exc}"}

    def _identity_columns(self, columns: list[int]) -> bool:
        """Whether ``columns`` is ``0 .. len(layers) - 1`` in order; remembered for the list object the
        caller passes every step (the watcher's), so it is checked once per layer registration."""
        cache = self._columns_cache
        if cache is None or cache[0] is not columns or cache[1] != len(columns) or cache[2] != len(self.layers):
            same = len(columns) == len(self.layers) and all(c == i for i, c in enumerate(columns))
            cache = self._columns_cache = (columns, len(columns), len(self.layers), same)
        return cache[3]

    def _track_update_peaks(self, step: int, record: np.ndarray) -> None:
        upd = record[:, _UPD]
        if np.isfinite(upd).any():
            upd = upd.astype(np.float64)
            # weights near zero (a zero-initialised head, a LoRA B) make any update look huge:
            # only count layers whose weights were at least a tenth of the 1/sqrt(fan_in) scale
            n = len(self.layers)
            if self._fan_numel is None or len(self._fan_numel[0]) != n:  # per layer registration, not per step
                self._fan_numel = (
                    np.array([self.layer_meta[name].fan_in or 0 for name in self.layers], dtype=np.float64),
                    np.array([max(1, self.layer_meta[name].numel) for name in self.layers], dtype=np.float64),
                )
            fan, numel = self._fan_numel
            with np.errstate(divide="ignore", invalid="ignore"):
                rms = self._last_wnorm[:n] / np.sqrt(numel)
                big_enough = (fan == 0) | (rms >= 0.1 / np.sqrt(np.where(fan > 0, fan, 1.0)))
            valid = np.isfinite(upd) & big_enough
            higher = valid & ~(upd <= self._peak_upd[:n])
            self._peak_upd[:n][higher] = upd[higher]
            self._peak_upd_step[:n][higher] = step
        w = record[:, _WN]
        seen = np.isfinite(w)
        if seen.any():  # weight norms are measured on slow steps only
            self._last_wnorm[: len(w)][seen] = w[seen]

    def append_sample(
        self, step: int, act_columns: list[int], act: np.ndarray, layer_columns: list[int], signal: np.ndarray
    ) -> None:
        a = np.full((len(self.activations), len(ACT_METRICS)), np.nan, dtype=np.float32)
        a[act_columns] = act
        s = np.full((len(self.layers), len(LAYER_SIGNAL_METRICS)), np.nan, dtype=np.float32)
        s[layer_columns] = signal
        self._act.append(step, a)
        self._signal.append(step, s)
        pair = s[:, _LAST_SIGNAL].astype(np.float64)
        finite = np.isfinite(pair).all(axis=1) & (pair[:, LAST_SIGNAL_METRICS.index("act_rms")] > 0)
        self._last_signal[: len(pair)][finite] = pair[finite]

    # -- reading ---------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the numeric buffers (the bound documented in the module docstring)."""
        return sum(r.nbytes for r in (self._grad, self._scalars, self._act, self._signal)) + self._summary.nbytes

    def _depth_order(self) -> list[int]:
        return sorted(range(len(self.layers)), key=lambda i: (self.layer_meta[self.layers[i]].depth, i))

    def view(self, last: int | None = None, last_samples: int | None = None, active_only: bool = False,
             lookback: int = 0) -> HistoryView:
        """The most recent ``last`` steps (all kept steps when ``None``) in depth order.

        ``active_only`` keeps only the layers and activations of the model as it is now (a fix may
        have replaced some); the diagnosis uses it, exports keep everything. ``lookback`` adds up to
        that many earlier steps' gradient norms, total norms and losses (``pre_*``) as a baseline.
        """
        order = self._depth_order()
        active = getattr(self, "_active_layers", None)
        if active_only and active:
            order = [i for i in order if self.layers[i] in active]
        steps, grad = self._grad.ordered(last)
        _, scalars = self._scalars.ordered(last)
        s_steps, act = self._act.ordered(last_samples)
        _, signal = self._signal.ordered(last_samples)
        if last is not None and len(steps) and len(s_steps):
            keep = s_steps >= steps[0]  # samples from inside the step window only
            s_steps, act, signal = s_steps[keep], act[keep], signal[keep]
        a_order = sorted(range(len(self.activations)), key=lambda i: (self.activation_meta[self.activations[i]].depth, i))
        active_acts = getattr(self, "_active_activations", None)
        if active_only and active_acts:
            a_order = [i for i in a_order if self.activations[i] in active_acts]
        return HistoryView(
            layers=[self.layers[i] for i in order],
            layer_meta=[self.layer_meta[self.layers[i]] for i in order],
            steps=steps,
            grad=grad[:, order] if grad.size else np.zeros((len(steps), len(order), len(GRAD_METRICS)), np.float32),
            total_norm=scalars[:, 0].astype(np.float64) if len(scalars) else np.zeros(0),
            loss=scalars[:, 1].astype(np.float64) if len(scalars) else np.zeros(0),
            activations=[self.activations[i] for i in a_order],
            activation_meta=[self.activation_meta[self.activations[i]] for i in a_order],
            sample_steps=s_steps,
            act=act[:, a_order] if act.size else np.zeros((len(s_steps), len(a_order), len(ACT_METRICS)), np.float32),
            signal=signal[:, order] if signal.size else np.zeros((len(s_steps), len(order), len(LAYER_SIGNAL_METRICS)), np.float32),
            first_nonfinite=self.first_nonfinite,
            peak_grad_to_weight=self._peak[order].copy() if len(self._peak) >= len(self.layers) else None,
            peak_step=self._peak_step[order].copy() if len(self._peak_step) >= len(self.layers) else None,
            initial_loss=float(np.median(self._first_losses)) if self._first_losses else None,
            peak_update_ratio=self._peak_upd[order].copy() if len(self._peak_upd) >= len(self.layers) else None,
            peak_update_step=self._peak_upd_step[order].copy() if len(self._peak_upd_step) >= len(self.layers) else None,
            nonfinite_steps=self.nonfinite_steps,
            total_steps=self.total_steps,
            context=dict(self.context),
            nonfinite_provenance=self.nonfinite_provenance,
            loss_scale=np.array([s for t, s in self.loss_scales if not len(steps) or t >= steps[0]], dtype=np.float64),
            lowest_zero_frac=self._lowest_zero_frac(order),
            **self._lookback(last, lookback, order),
            last_finite_signal=self._last_signal[order].copy() if len(self._last_signal) >= len(self.layers) else None,
            last_weight_norm=self._last_wnorm[order].copy() if len(self._last_wnorm) >= len(self.layers) else None,
        )

    def _lowest_zero_frac(self, order: list[int]) -> np.ndarray:
        """Per layer, the lowest block mean of the exactly-zero gradient fraction over the whole run."""
        _, _, mean = self._summary.means()
        if not len(mean):
            return np.full(len(order), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmin(mean[:, :, _ZF], axis=0)[order]

    def _lookback(self, last: int | None, lookback: int, order: list[int]) -> dict[str, np.ndarray]:
        if last is None or lookback <= 0:
            return {}
        steps, grad = self._grad.ordered(last + lookback)
        _, scalars = self._scalars.ordered(last + lookback)
        k = max(0, len(steps) - last)
        return {"pre_steps": steps[:k], "pre_grad_norm": grad[:k][:, order, _GN] if k else np.zeros((0, len(order)), np.float32),
                "pre_total_norm": scalars[:k, 0].astype(np.float64), "pre_loss": scalars[:k, 1].astype(np.float64)}

    def to_dataframe(self, include_long_term: bool = False) -> pd.DataFrame:
        """Long format: one row per ``(step, layer, metric)`` with columns ``step, layer, metric, value, depth``.

        Global series use the layer name ``"(total)"`` (``grad_norm``: the total norm; ``loss``).
        With ``include_long_term`` the long-term block means for steps before the recent window are
        prepended (their ``step`` is the block's last step, ``metric`` as usual).
        """
        v = self.view()
        frames: list[pd.DataFrame] = []
        depth = {name: i for i, name in enumerate(v.layers)}
        adepth = {name: len(v.layers) + i for i, name in enumerate(v.activations)}
        if include_long_term:
            first, last, mean = self._summary.means()
            keep = last < (v.steps[0] if len(v.steps) else np.iinfo(np.int64).max)
            if keep.any():
                order = self._depth_order()
                frames.append(_long(last[keep], [self.layers[i] for i in order], GRAD_METRICS, mean[keep][:, order], depth))
        if len(v.steps):
            frames.append(_long(v.steps, v.layers, GRAD_METRICS, v.grad, depth))
            scalars = np.stack([v.total_norm, v.loss], axis=1)[:, None, :]
            frames.append(_long(v.steps, ["(total)"], ("grad_norm", "loss"), scalars, {"(total)": -1}))
        if len(v.sample_steps):
            frames.append(_long(v.sample_steps, v.activations, ACT_METRICS, v.act, adepth))
            frames.append(_long(v.sample_steps, v.layers, LAYER_SIGNAL_METRICS, v.signal, depth))
        if not frames:
            return pd.DataFrame({"step": pd.Series(dtype="int64"), "layer": pd.Series(dtype="object"),
                                 "metric": pd.Series(dtype="object"), "value": pd.Series(dtype="float64"),
                                 "depth": pd.Series(dtype="int64")})
        df = pd.concat(frames, ignore_index=True)
        return df.dropna(subset=["value"]).reset_index(drop=True)

    def summary_frame(self, last: int | None = None) -> pd.DataFrame:
        """Wide per-layer view: one row per layer in depth order, median of each metric over the window."""
        v = self.view(last)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(v.grad, axis=0) if len(v.steps) else np.full((len(v.layers), len(GRAD_METRICS)), np.nan)
                sig = np.nanmedian(v.signal, axis=0) if len(v.sample_steps) else np.full((len(v.layers), len(LAYER_SIGNAL_METRICS)), np.nan)
        df = pd.DataFrame(med, columns=list(GRAD_METRICS), index=pd.Index(v.layers, name="layer"))
        for i, m in enumerate(LAYER_SIGNAL_METRICS):
            df[m] = sig[:, i]
        df.insert(0, "type", [m.type_name for m in v.layer_meta])
        df.insert(1, "depth", range(len(v.layers)))
        return df


def _long(steps: np.ndarray, names: list[str], metrics: tuple[str, ...], values: np.ndarray, depth: dict[str, int]) -> pd.DataFrame:
    t, lyr, met = values.shape[0], values.shape[1], values.shape[2]
    return pd.DataFrame({
        "step": np.repeat(steps.astype(np.int64), lyr * met),
        "layer": np.tile(np.repeat(np.array(names, dtype=object), met), t),
        "metric": np.tile(np.array(metrics, dtype=object), t * lyr),
        "value": values.reshape(-1).astype(np.float64),
        "depth": np.tile(np.repeat(np.array([depth.get(n, 0) for n in names], dtype=np.int64), met), t),
    })


__all__ = ["ActivationMeta", "History", "HistoryView", "LAST_SIGNAL_METRICS", "LayerMeta"]
