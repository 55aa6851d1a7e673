"""What the diagnosis reads: a window of history in depth order, and the metadata of its layers.

A :class:`HistoryView` is plain arrays (NaN = not measured) indexed by the metric schema in
:mod:`gradwatch.metrics`; :class:`gradwatch.history.History` builds it from its buffers, and
:meth:`HistoryView.from_dataframe` rebuilds it from logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from gradwatch import provenance
from gradwatch.metrics import ACT_METRICS, ACTIVATION, GRAD, GRAD_METRICS, LAYER_SIGNAL_METRICS, SIGNAL

#: the columns of ``HistoryView.last_finite_signal``
LAST_SIGNAL_METRICS: tuple[str, ...] = ("act_rms", "out_grad_rms")


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
        return self.grad[:, :, GRAD[name]]

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
            for step, layer, metric, value in grad_rows[["step", "layer", "metric", "value"]].itertuples(index=False):
                if layer in l_idx:
                    grad[s_idx[int(step)], l_idx[layer], GRAD[metric]] = value
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
                    act[s_idx[int(step)], a_idx[layer], ACTIVATION[metric]] = value
                elif metric in LAYER_SIGNAL_METRICS and layer in l_idx:
                    signal[s_idx[int(step)], l_idx[layer], SIGNAL[metric]] = value
        first_nf = None
        nf_steps = 0
        if len(steps):
            nf = grad[:, :, GRAD["nonfinite"]]
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
