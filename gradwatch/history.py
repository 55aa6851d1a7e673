"""Bounded columnar store of per-step, per-layer statistics, and the views the diagnosis reads.

Memory is bounded whatever the run length:

- a ring buffer of the most recent ``capacity`` collected steps, ``float32[capacity, layers, 8]``
  for gradient metrics (``capacity * layers * 32`` bytes, plus ``capacity * 24`` for step numbers,
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
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd

from gradwatch import provenance
from gradwatch.activations import ACT_METRICS, LAYER_SIGNAL_METRICS
from gradwatch.collect import GRAD_METRICS


@dataclass
class LayerMeta:
    """What the diagnosis needs to know about a layer besides its numbers."""

    type_name: str = ""
    depth: int = 0
    fan_in: int | None = None
    numel: int = 0
    recurrent: bool = False


@dataclass
class ActivationMeta:
    kind: str = ""               # "relu" | "leaky" | "sigmoid" | "tanh" | "hard"
    type_name: str = ""
    depth: int = 0
    feeding_layer: str | None = None
    is_output: bool = False      # nothing with parameters runs after it: it defines the output range


@dataclass
class HistoryView:
    """A read-only window of history in depth order: the input of :func:`gradwatch.diagnose`.

    Arrays use NaN for "not measured". ``grad[t, l, m]`` follows ``GRAD_METRICS``; ``act[s, a, m]``
    follows ``ACT_METRICS``; ``signal[s, l, m]`` follows ``LAYER_SIGNAL_METRICS``.
    """

    layers: list[str]
    layer_meta: list[LayerMeta]
    steps: np.ndarray
    grad: np.ndarray
    total_norm: np.ndarray
    loss: np.ndarray
    activations: list[str] = field(default_factory=list)
    activation_meta: list[ActivationMeta] = field(default_factory=list)
    sample_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    act: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, len(ACT_METRICS)), dtype=np.float32))
    signal: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, len(LAYER_SIGNAL_METRICS)), dtype=np.float32))
    first_nonfinite: tuple[int, list[str]] | None = None
    nonfinite_steps: int = 0
    total_steps: int = 0
    context: dict[str, Any] = field(default_factory=dict)
    #: run-long largest grad-to-weight ratio per layer (depth order) and the step it happened at:
    #: an explosion that wrecked a layer early stays visible after it leaves the window.
    peak_grad_to_weight: np.ndarray | None = None
    peak_step: np.ndarray | None = None
    #: run-long largest measured update-to-weight ratio per layer (one optimizer step's size relative to
    #: the weights) and its step; layers whose weights were near zero at the time are left out.
    peak_update_ratio: np.ndarray | None = None
    peak_update_step: np.ndarray | None = None
    #: median loss of the run's first (up to 10) recorded steps: where learning started from
    initial_loss: float | None = None
    #: the evidence frozen at the first non-finite step (:func:`gradwatch.provenance.capture`): kept
    #: for the whole run, so a window that is all NaN can still say what led to it
    nonfinite_provenance: dict[str, Any] | None = None
    #: AMP loss scales recorded inside the window (fp16 loss scaling; empty when not recorded)
    loss_scale: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: per layer (depth order), the run's lowest block-mean fraction of exactly-zero gradient elements
    lowest_zero_frac: np.ndarray | None = None
    #: up to ``lookback`` steps *before* the window (gradient norms ``[steps, layers]``, total norms,
    #: losses): a baseline for rules that compare a step with its own recent history (spikes)
    pre_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pre_grad_norm: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    pre_total_norm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pre_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: per layer (depth order), the latest *finite* sampled ``act_rms`` and ``out_grad_rms`` and the
    #: latest finite weight norm: the forward signal as it was before a run went non-finite (a
    #: diverged run's window holds only NaN, yet its cause was visible at the first samples).
    last_finite_signal: np.ndarray | None = None
    last_weight_norm: np.ndarray | None = None

    def metric(self, name: str) -> np.ndarray:
        """``[steps, layers]`` array of one gradient metric."""
        return self.grad[:, :, GRAD_METRICS.index(name)]

    @classmethod
    def from_dataframe(
        cls,
        df: pd.DataFrame,
        context: dict[str, Any] | None = None,
        layer_meta: dict[str, LayerMeta] | None = None,
        activation_meta: dict[str, ActivationMeta] | None = None,
    ) -> HistoryView:
        """Rebuild a view from a long-format frame (``step, layer, metric, value``), e.g. read from logs.

        Layer order is taken from an optional ``depth`` column, else from first appearance.
        Rows whose layer is ``"(total)"`` carry global series (``grad_norm`` -> total norm, ``loss``).
        A name is a layer if it has gradient or signal metrics and an activation if it has activation
        metrics (a PReLU is both). ``layer_meta`` / ``activation_meta`` (e.g. logged with the run)
        supply the types, fan-in and activation kinds the rules need; without them the view knows
        names and order only.
        """
        df = df.dropna(subset=["value"]) if len(df) else df
        total = df[df["layer"] == "(total)"] if len(df) else df
        rest = df[df["layer"] != "(total)"] if len(df) else df
        grad_rows = rest[rest["metric"].isin(GRAD_METRICS)] if len(rest) else rest

        def ordered(rows: pd.DataFrame) -> list[str]:
            if not len(rows):
                return []
            if "depth" in rows.columns:
                return rows.groupby("layer", sort=False)["depth"].min().sort_values(kind="stable").index.tolist()
            return list(dict.fromkeys(rows["layer"].tolist()))

        is_act = rest["metric"].isin(ACT_METRICS) if len(rest) else pd.Series(dtype=bool)
        act_names = ordered(rest[is_act]) if len(rest) else []
        layer_names = ordered(rest[~is_act]) if len(rest) else []
        steps = np.array(sorted(set(grad_rows["step"].astype(int))) if len(grad_rows) else [], dtype=np.int64)
        grad = np.full((len(steps), len(layer_names), len(GRAD_METRICS)), np.nan, dtype=np.float32)
        if len(grad_rows):
            s_idx = {s: i for i, s in enumerate(steps)}
            l_idx = {n: i for i, n in enumerate(layer_names)}
            m_idx = {m: i for i, m in enumerate(GRAD_METRICS)}
            for step, layer, metric, value in grad_rows[["step", "layer", "metric", "value"]].itertuples(index=False):
                if layer in l_idx:
                    grad[s_idx[int(step)], l_idx[layer], m_idx[metric]] = value
        tn = np.full(len(steps), np.nan)
        loss = np.full(len(steps), np.nan)
        if len(total):
            s_idx = {s: i for i, s in enumerate(steps)}
            for step, metric, value in total[["step", "metric", "value"]].itertuples(index=False):
                i = s_idx.get(int(step))
                if i is None:
                    continue
                if metric == "grad_norm":
                    tn[i] = value
                elif metric == "loss":
                    loss[i] = value
        finite_loss = loss[np.isfinite(loss)]
        initial_loss = float(np.median(finite_loss[:10])) if len(finite_loss) else None
        sig_rows = rest[rest["metric"].isin(LAYER_SIGNAL_METRICS + ACT_METRICS)] if len(rest) else rest
        sample_steps = np.array(sorted(set(sig_rows["step"].astype(int))) if len(sig_rows) else [], dtype=np.int64)
        act = np.full((len(sample_steps), len(act_names), len(ACT_METRICS)), np.nan, dtype=np.float32)
        signal = np.full((len(sample_steps), len(layer_names), len(LAYER_SIGNAL_METRICS)), np.nan, dtype=np.float32)
        if len(sig_rows):
            s_idx = {s: i for i, s in enumerate(sample_steps)}
            a_idx = {n: i for i, n in enumerate(act_names)}
            l_idx = {n: i for i, n in enumerate(layer_names)}
            for step, layer, metric, value in sig_rows[["step", "layer", "metric", "value"]].itertuples(index=False):
                if metric in ACT_METRICS and layer in a_idx:
                    act[s_idx[int(step)], a_idx[layer], ACT_METRICS.index(metric)] = value
                elif metric in LAYER_SIGNAL_METRICS and layer in l_idx:
                    signal[s_idx[int(step)], l_idx[layer], LAYER_SIGNAL_METRICS.index(metric)] = value
        first_nf = None
        nf_steps = 0
        if len(steps):
            nf = grad[:, :, GRAD_METRICS.index("nonfinite")]
            bad = np.nan_to_num(nf) > 0
            nf_steps = int(bad.any(axis=1).sum())
            if bad.any():
                t = int(np.argmax(bad.any(axis=1)))
                first_nf = (int(steps[t]), [layer_names[i] for i in np.flatnonzero(bad[t])])
        out = cls(
            initial_loss=initial_loss,
            layers=layer_names,
            layer_meta=[replace(layer_meta[n], depth=i) if layer_meta and n in layer_meta else LayerMeta(depth=i)
                        for i, n in enumerate(layer_names)],
            steps=steps,
            grad=grad,
            total_norm=tn,
            loss=loss,
            activations=act_names,
            activation_meta=[replace(activation_meta[n], depth=i) if activation_meta and n in activation_meta
                             else ActivationMeta(depth=i) for i, n in enumerate(act_names)],
            sample_steps=sample_steps,
            act=act,
            signal=signal,
            first_nonfinite=first_nf,
            nonfinite_steps=nf_steps,
            total_steps=len(steps),
            context=dict(context or {}),
        )
        if first_nf is not None:  # logs hold every step: the evidence before the first NaN is there
            out.nonfinite_provenance = provenance.capture(out, first_nf[0], first_nf[1])
        return out


class _Ring:
    """Fixed-capacity ring of equally shaped float32 records with their step numbers."""

    def __init__(self, capacity: int, shape: tuple[int, ...]):
        self.capacity = capacity
        self.data = np.full((capacity, *shape), np.nan, dtype=np.float32)
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.count = 0  # total appended

    def append(self, step: int, record: np.ndarray) -> None:
        i = self.count % self.capacity
        if record.shape[0] != self.data.shape[1]:  # a shorter record: NaN in the columns it lacks
            self.data[i] = np.nan
        self.data[i, : record.shape[0], ...] = record
        self.steps[i] = step
        self.count += 1

    def extend(self, steps: np.ndarray, records: np.ndarray) -> None:
        """``append`` for several records of full width at once (one or two slice assignments)."""
        k = len(records)
        if k > self.capacity:
            steps, records = steps[-self.capacity:], records[-self.capacity:]
            self.count += k - self.capacity
            k = self.capacity
        i = self.count % self.capacity
        first = min(k, self.capacity - i)
        self.data[i:i + first] = records[:first]
        self.steps[i:i + first] = steps[:first]
        if first < k:  # wraps around
            self.data[: k - first] = records[first:]
            self.steps[: k - first] = steps[first:]
        self.count += k

    def grow(self, axis1: int) -> None:
        """Add columns along the first record axis (new layers), filled with NaN."""
        extra = axis1 - self.data.shape[1]
        if extra > 0:
            pad = np.full((self.capacity, extra, *self.data.shape[2:]), np.nan, dtype=np.float32)
            self.data = np.concatenate([self.data, pad], axis=1)

    def ordered(self, last: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.count, self.capacity)
        if last is not None:
            n = min(n, last)
        idx = (np.arange(self.count - n, self.count) % self.capacity) if n else np.zeros(0, dtype=np.int64)
        return self.steps[idx], self.data[idx]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.steps.nbytes


class _Summary:
    """Long-term means over blocks of steps; merges pairs of blocks when full (bounded slots)."""

    def __init__(self, slots: int, shape: tuple[int, ...]):
        self.slots = max(2, slots - slots % 2)
        self.sums = np.zeros((self.slots, *shape), dtype=np.float64)
        self.counts = np.zeros((self.slots, *shape), dtype=np.float64)
        self.first = np.zeros(self.slots, dtype=np.int64)
        self.last = np.zeros(self.slots, dtype=np.int64)
        self.filled = 0
        self.block = 1
        self._in_block = 0

    def add(self, step: int, record: np.ndarray) -> None:
        if self._in_block == 0:
            if self.filled == self.slots:
                self._merge()
            i = self.filled
            self.sums[i] = 0
            self.counts[i] = 0
            self.first[i] = step
            self.filled += 1
        i = self.filled - 1
        finite = np.isfinite(record)
        k = record.shape[0]
        self.sums[i, :k] += np.where(finite, record, np.float32(0))  # float32 where, float64 sum
        self.counts[i, :k] += finite
        self.last[i] = step
        self._in_block = (self._in_block + 1) % self.block

    def _merge(self) -> None:
        half = self.slots // 2
        # pair by pair, in place: whole-array sums would allocate temporaries as large as the
        # summary itself (which the allocator keeps: resident memory beyond the documented bound)
        for j in range(half):
            np.add(self.sums[2 * j], self.sums[2 * j + 1], out=self.sums[j])
            np.add(self.counts[2 * j], self.counts[2 * j + 1], out=self.counts[j])
        self.first[:half] = self.first[0::2]
        self.last[:half] = self.last[1::2]
        self.filled = half
        self.block *= 2

    def grow(self, axis1: int) -> None:
        extra = axis1 - self.sums.shape[1]
        if extra > 0:
            pad = np.zeros((self.slots, extra, *self.sums.shape[2:]))
            self.sums = np.concatenate([self.sums, pad], axis=1)
            self.counts = np.concatenate([self.counts, pad.copy()], axis=1)

    def means(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.filled
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.counts[:n] > 0, self.sums[:n] / np.maximum(self.counts[:n], 1), np.nan)
        return self.first[:n], self.last[:n], mean

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes + self.counts.nbytes + self.first.nbytes + self.last.nbytes


class History:
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
        self._grad = _Ring(capacity, (0, len(GRAD_METRICS)))
        self._scalars = _Ring(capacity, (2,))  # total_norm, loss
        self._act = _Ring(sample_capacity, (0, len(ACT_METRICS)))
        self._signal = _Ring(sample_capacity, (0, len(LAYER_SIGNAL_METRICS)))
        self._summary = _Summary(summary_slots, (0, len(GRAD_METRICS)))
        self.first_nonfinite: tuple[int, list[str]] | None = None
        self.nonfinite_provenance: dict[str, Any] | None = None
        #: (step, scale) of the AMP loss scale, as recorded (bounded like the recent window)
        self.loss_scales: deque[tuple[int, float]] = deque(maxlen=capacity)
        self._peak = np.zeros(0)
        self._peak_upd = np.zeros(0)
        self._peak_upd_step = np.zeros(0, dtype=np.int64)
        self._last_wnorm = np.zeros(0)
        self._last_signal = np.zeros((0, 2))
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
            self._last_signal = np.concatenate([self._last_signal, np.full((extra, 2), np.nan)])
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
        pair = s[:, :2].astype(np.float64)
        finite = np.isfinite(pair).all(axis=1) & (pair[:, 0] > 0)
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


    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything kept (recent window, samples, long-term summary, counters) as plain data.

        Arrays are ``torch.Tensor`` (float32 values, int64 steps) and everything else is built-in
        Python types, so the result fits in a checkpoint and loads with ``torch.load(weights_only=True)``.
        Only the records actually held are stored, oldest first.
        """
        import torch

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a).copy())

        steps, grad = self._grad.ordered()
        _, scalars = self._scalars.ordered()
        s_steps, act = self._act.ordered()
        _, signal = self._signal.ordered()
        sm = self._summary
        n = sm.filled
        return {
            "version": _STATE_VERSION,
            "capacity": self._grad.capacity,
            "sample_capacity": self._act.capacity,
            "layers": list(self.layers),
            "layer_meta": {name: asdict(self.layer_meta[name]) for name in self.layers},
            "activations": list(self.activations),
            "activation_meta": {name: asdict(self.activation_meta[name]) for name in self.activations},
            "steps": tensor(steps),
            "grad": tensor(grad),
            "scalars": tensor(scalars),
            "sample_steps": tensor(s_steps),
            "act": tensor(act),
            "signal": tensor(signal),
            "summary": {
                "slots": sm.slots, "block": sm.block, "in_block": sm._in_block,
                "sums": tensor(sm.sums[:n]), "counts": tensor(sm.counts[:n]),
                "first": tensor(sm.first[:n]), "last": tensor(sm.last[:n]),
            },
            "first_nonfinite": None if self.first_nonfinite is None else [self.first_nonfinite[0], list(self.first_nonfinite[1])],
            "nonfinite_provenance": self.nonfinite_provenance,
            "loss_scales": [list(x) for x in self.loss_scales],
            "nonfinite_steps": self.nonfinite_steps,
            "total_steps": self.total_steps,
            "context": dict(self.context),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the recorded data with ``state`` (from :meth:`state_dict`), keeping this history's columns.

        Layers and activations are matched **by name**: those already registered here keep their
        column and their (current) metadata, names only in ``state`` are appended, so a watcher that
        registered its layers before loading keeps working. Records beyond this history's capacity
        are dropped oldest first. Keys missing from older states fall back to empty defaults.

        Raises:
            ValueError: ``state`` comes from a newer, unknown format version.
        """
        version = int(state.get("version", 1))
        if version > _STATE_VERSION:
            raise ValueError(f"History state version {version} is newer than supported ({_STATE_VERSION})")
        names = [str(n) for n in state.get("layers", [])]
        metas = state.get("layer_meta", {})
        new = [n for n in names if n not in self.layer_meta]
        if new:
            self.register_layers(new, [_meta(LayerMeta, metas.get(n)) for n in new])
        anames = [str(n) for n in state.get("activations", [])]
        ametas = state.get("activation_meta", {})
        new_a = [n for n in anames if n not in self.activation_meta]
        if new_a:
            self.register_activations(new_a, [_meta(ActivationMeta, ametas.get(n)) for n in new_a])
        col = {n: i for i, n in enumerate(self.layers)}
        acol = {n: i for i, n in enumerate(self.activations)}
        lmap = np.array([col[n] for n in names], dtype=np.int64)
        amap = np.array([acol[n] for n in anames], dtype=np.int64)

        def array(key: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
            value = state.get(key)
            if value is None:
                return np.zeros(tuple(max(0, d) for d in shape), dtype=dtype)
            return np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=dtype).reshape(shape)

        steps = array("steps", (-1,), np.int64)
        t = len(steps)
        grad = array("grad", (t, len(names), len(GRAD_METRICS)))
        scalars = array("scalars", (t, 2))
        s_steps = array("sample_steps", (-1,), np.int64)
        s = len(s_steps)
        act = array("act", (s, len(anames), len(ACT_METRICS)))
        signal = array("signal", (s, len(names), len(LAYER_SIGNAL_METRICS)))
        n_l, n_a = len(self.layers), len(self.activations)
        self._grad = _Ring(self._grad.capacity, (n_l, len(GRAD_METRICS)))
        self._scalars = _Ring(self._scalars.capacity, (2,))
        self._act = _Ring(self._act.capacity, (n_a, len(ACT_METRICS)))
        self._signal = _Ring(self._signal.capacity, (n_l, len(LAYER_SIGNAL_METRICS)))
        for i in range(t):
            record = np.full((n_l, len(GRAD_METRICS)), np.nan, dtype=np.float32)
            record[lmap] = grad[i]
            self._grad.append(int(steps[i]), record)
            self._scalars.append(int(steps[i]), scalars[i])
        for i in range(s):
            a = np.full((n_a, len(ACT_METRICS)), np.nan, dtype=np.float32)
            a[amap] = act[i]
            sig = np.full((n_l, len(LAYER_SIGNAL_METRICS)), np.nan, dtype=np.float32)
            sig[lmap] = signal[i]
            self._act.append(int(s_steps[i]), a)
            self._signal.append(int(s_steps[i]), sig)
        summary = state.get("summary") or {}
        sm = _Summary(int(summary.get("slots", self._summary.slots)), (n_l, len(GRAD_METRICS)))
        first = np.asarray(summary.get("first", np.zeros(0)), dtype=np.int64).reshape(-1)
        filled = min(len(first), sm.slots)
        if filled:
            shape = (len(first), len(names), len(GRAD_METRICS))
            sums = np.asarray(summary["sums"], dtype=np.float64).reshape(shape)
            counts = np.asarray(summary["counts"], dtype=np.float64).reshape(shape)
            sm.sums[:filled][:, lmap] = sums[:filled]
            sm.counts[:filled][:, lmap] = counts[:filled]
            sm.first[:filled] = first[:filled]
            sm.last[:filled] = np.asarray(summary["last"], dtype=np.int64).reshape(-1)[:filled]
            sm.filled = filled
            sm.block = int(summary.get("block", 1))
            sm._in_block = int(summary.get("in_block", 0))
        self._summary = sm
        fnf = state.get("first_nonfinite")
        self.first_nonfinite = None if fnf is None else (int(fnf[0]), [str(n) for n in fnf[1]])
        self.nonfinite_provenance = state.get("nonfinite_provenance")
        self.loss_scales.clear()
        self.loss_scales.extend((int(t), float(s)) for t, s in state.get("loss_scales", []))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.total_steps = int(state.get("total_steps", t))
        context = dict(state.get("context", {}))
        context.update(self.context)  # what the current run set up wins over the saved context
        self.context = context


_STATE_VERSION = 1
_NONFINITE = GRAD_METRICS.index("nonfinite")
_GN = GRAD_METRICS.index("grad_norm")
_ZF = GRAD_METRICS.index("grad_zero_frac")
#: steps recorded in one batch may follow the first non-finite one: look back past them
_RECORD_SLACK = 64
_GTW = GRAD_METRICS.index("grad_to_weight")
_UPD = GRAD_METRICS.index("update_ratio")
_WN = GRAD_METRICS.index("weight_norm")


def _meta(cls: type, data: dict[str, Any] | None) -> Any:
    """Build a metadata dataclass from a saved dict, ignoring keys this version does not know."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (data or {}).items() if k in known})


def _long(steps: np.ndarray, names: list[str], metrics: tuple[str, ...], values: np.ndarray, depth: dict[str, int]) -> pd.DataFrame:
    t, lyr, met = values.shape[0], values.shape[1], values.shape[2]
    return pd.DataFrame({
        "step": np.repeat(steps.astype(np.int64), lyr * met),
        "layer": np.tile(np.repeat(np.array(names, dtype=object), met), t),
        "metric": np.tile(np.array(metrics, dtype=object), t * lyr),
        "value": values.reshape(-1).astype(np.float64),
        "depth": np.tile(np.repeat(np.array([depth.get(n, 0) for n in names], dtype=np.int64), met), t),
    })
