"""Causes that compound across depth: gains per layer, multiplied along un-normalised paths.

No single layer needs to be far off for a deep network to fail: a ReLU MLP whose layers sit at
0.71x the He scale halves the signal's variance at every layer, ``2**-30`` over 30 layers; a
residual stack without normalisation whose branches are at He scale triples the stream's
variance at every block. These rules find such causes from two kinds of evidence:

- *weights*: a layer's variance gain is ``fan_in * Var(W)`` (for random weights independent of
  their input, ``E[(Wx)^2] = fan_in * Var(W) * E[x^2]``), times the mean-square factor of the
  activation it feeds (``E[phi(z)^2] / E[z^2]``: 1/2 for ReLU, which is why He et al. 2015 use
  ``Var(W) = 2 / fan_in``; 1 for identity and tanh near 0, Glorot & Bengio 2010). Multiplied
  along a path that no normalisation layer interrupts, it predicts how the forward signal (and,
  through the same gains, the backward one) grows or decays with depth.
- *measurement*: the sampled forward signal per layer (``act_rms``). Its decay must agree with
  the weights' prediction before the initialisation is named as the cause (an invisible
  normalisation would contradict it). Where a layer's *input* (inferred as
  ``act_rms^2 / (fan_in Var(W))``) is larger than the previous layer's output can explain, something
  was added to the signal in between: a residual connection. Additions of that kind, repeated
  without normalisation, make the stream grow geometrically (Fixup, SkipInit, ReZero).

Pure functions of a :class:`~gradwatch.history.HistoryView` (numpy only): testable on synthetic
histories, and on histories rebuilt from logs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.fixes.registry import fix_reason
from gradwatch.history import LAST_SIGNAL_METRICS, HistoryView
from gradwatch.metrics import SIGNAL
from gradwatch.thresholds import Thresholds

#: ``E[phi(z)^2] / E[z^2]`` for the activation modules gradwatch sees, at unit-variance Gaussian
#: input (``tests/test_causes.py`` checks them by sampling). ReLU-like ones are positively
#: homogeneous (exact at any scale); tanh-like ones are linear near 0, where a decaying signal
#: lives, so 1 (an upper bound: a decay predicted with it is at least that large). ``None``: not
#: zero-centred (sigmoid, softplus): the forward mean square says nothing about the gradient.
ACTIVATION_MEAN_SQUARE: dict[str, float | None] = {
    "ReLU": 0.5, "ReLU6": 0.5, "LeakyReLU": 0.5, "PReLU": 0.53, "RReLU": 0.53,
    "ELU": 0.645, "CELU": 0.645, "SELU": 1.0, "GELU": 0.426, "SiLU": 0.356, "Mish": 0.453,
    "Hardswish": 0.332, "Tanh": 1.0, "Hardtanh": 1.0, "Softsign": 1.0,
    "Sigmoid": None, "Hardsigmoid": None, "Softplus": None,
}
#: A junction whose input is this much larger (in mean square) than the previous layer's output
#: explains has had something added: well above the sampling error of a mean square over a batch
#: (a few percent), below the ``1 + stream/branch`` of any residual addition whose branch is not
#: far larger than the stream it joins.
RESIDUAL_JUNCTION_RATIO = 1.25
#: Adding ``n`` uncorrelated branches of comparable size to a stream grows its RMS by ``sqrt(n + 1)``
#: (a pre-LN transformer's residual stream, a ResNet whose branches end in BatchNorm): healthy. A
#: stream growing this many decades beyond that multiplies, block after block.
ADDITIVE_MARGIN_DECADES = 1.0
#: A link (a layer and the activation it feeds) whose variance gain is below this is part of a
#: compound decay (above ``1 / this``: of a compound growth); He scale gives 1.
LINK_TOLERANCE = 0.9
#: Backward mean squares of a real link ``i -> j`` agree with ``gain_j * act_factor_i`` up to this
#: factor (width changes between layers, a batch's sampling spread, a ReLU's mask); attention's side-by-
#: side projections are off by the inverse of their own gain (~1/0.01 at a 0.02-std init).
SEQUENTIAL_TOLERANCE = 10.0
_NORM_MARKERS = ("Norm",)
_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")  # a whole name component that is a number
_BREAK_TYPES = ("Embedding", "EmbeddingBag", "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell",
                "MultiheadAttention")


@dataclass
class Chain:
    """Per-layer facts along the depth order (NaN where unknown).

    Attributes:
        gain: ``fan_in * Var(W)`` per layer (weights' variance gain).
        act_factor: mean-square factor of the activation each layer feeds (1 when it feeds none).
        act_rms: latest finite sampled RMS of each layer's output.
        out_grad_rms: latest finite sampled RMS of the gradient with respect to that output.
        segments: runs of consecutive plain matrix layers (Linear/Conv) with no normalisation,
            recurrence or non-zero-centred activation between them, in depth order.
    """

    gain: np.ndarray
    act_factor: np.ndarray
    act_rms: np.ndarray
    out_grad_rms: np.ndarray
    segments: list[list[int]] = field(default_factory=list)

    def link(self, i: int) -> float:
        """Variance gain of layer ``i`` and the activation it feeds."""
        return float(self.gain[i] * self.act_factor[i])


def build_chain(view: HistoryView, weight_norm: np.ndarray) -> Chain:
    """The chain of variance gains of ``view``'s layers (weights as of ``weight_norm``)."""
    n = len(view.layers)
    gain = np.full(n, np.nan)
    for i, m in enumerate(view.layer_meta):
        if m.fan_in and m.numel and i < len(weight_norm) and math.isfinite(weight_norm[i]) and not m.recurrent:
            gain[i] = m.fan_in * (weight_norm[i] ** 2 / m.numel)
    factor = np.ones(n)
    index = {name: i for i, name in enumerate(view.layers)}
    for meta in view.activation_meta:
        i = index.get(meta.feeding_layer or "")
        if i is not None:
            f = ACTIVATION_MEAN_SQUARE.get(meta.type_name, math.nan)
            factor[i] = math.nan if f is None else f
    act_rms, out_grad_rms = _latest_signal(view, "act_rms"), _latest_signal(view, "out_grad_rms")
    segments: list[list[int]] = []
    current: list[int] = []
    for i, m in enumerate(view.layer_meta):
        plain = math.isfinite(gain[i]) and not m.type_name.startswith(_BREAK_TYPES)
        if not plain or any(mark in m.type_name for mark in _NORM_MARKERS):
            if len(current) > 1:
                segments.append(current)
            current = []
            continue
        current.append(i)
        if not math.isfinite(factor[i]):  # the signal past a non-zero-centred activation is not this chain's
            if len(current) > 1:
                segments.append(current)
            current = []
    if len(current) > 1:
        segments.append(current)
    return Chain(gain=gain, act_factor=factor, act_rms=act_rms, out_grad_rms=out_grad_rms, segments=segments)


def _latest_signal(view: HistoryView, metric: str) -> np.ndarray:
    """Latest finite sample of ``metric`` (``act_rms`` or ``out_grad_rms``) per layer: the window's samples
    first, then the run's record (a diverged run's window holds only NaN)."""
    n = len(view.layers)
    out = np.full(n, np.nan)
    if len(view.sample_steps) and view.signal.shape[1] == n:
        rms = view.signal[:, :, SIGNAL[metric]].astype(np.float64)
        for i in range(n):
            col = rms[:, i][np.isfinite(rms[:, i]) & (rms[:, i] > 0)]
            if len(col):
                out[i] = col[-1]
    last = view.last_finite_signal
    if last is not None and len(last) == n:
        missing = ~np.isfinite(out)
        out[missing] = last[missing, LAST_SIGNAL_METRICS.index(metric)]
    return out


@dataclass(frozen=True)
class CompoundInit:
    """A decay (or growth) the initialisation explains: the weights' compound gain along a chain."""

    layers: list[str]          # the chain's layers whose link is off He/Xavier scale (the fix's targets)
    predicted_decades: float   # -log10 of the compound RMS gain the weights predict (> 0: decay)
    measured_decades: float    # the same, measured from the sampled forward signal (NaN: no sample)
    median_link: float         # typical per-layer variance gain (1 = He/Xavier)
    depth: int                 # links in the chain

    def describe(self) -> str:
        sense = "shrinks" if self.predicted_decades > 0 else "grows"
        ratio = self.median_link
        return (f"the initialisation compounds: each layer multiplies the signal's variance by ~{ratio:.2g} "
                f"({math.sqrt(ratio):.2g}x the scale that keeps it, He/Xavier for its activation), so over "
                f"{self.depth} un-normalised layers it {sense} by {10 ** min(abs(self.predicted_decades), 300.0):.2g}x in RMS "
                f"({abs(self.predicted_decades):.1f} orders of magnitude"
                + (f"; measured: {abs(self.measured_decades):.1f})" if math.isfinite(self.measured_decades) else ")"))

    def evidence(self) -> dict[str, Any]:
        return {"compound_init": {"predicted_decades": round(self.predicted_decades, 2),
                                  "measured_decades": None if not math.isfinite(self.measured_decades)
                                  else round(self.measured_decades, 2),
                                  "median_link_variance_gain": round(self.median_link, 3), "depth": self.depth}}


def compound_init(view: HistoryView, chain: Chain, needed_decades: float, sign: float = 1.0) -> CompoundInit | None:
    """The longest-reaching chain whose weights alone predict ``needed_decades`` of decay
    (``sign=1``) or growth (``sign=-1``) of the RMS signal, confirmed by the measured signal.

    The model's last matrix layer is left out (it sets the output's scale, not the path's), and
    a chain is only believed when the sampled forward signal (where sampled) decays or grows by at
    least half what the weights predict: an unseen normalisation or addition would contradict it.
    """
    if needed_decades <= 0:
        return None
    last_layer = max((s[-1] for s in chain.segments), default=-1)
    best: CompoundInit | None = None
    runs = [run for seg in chain.segments for run in _sequential_runs(chain, [i for i in seg if i != last_layer])]
    for links in runs:
        if len(links) < 2:
            continue
        logs = np.array([math.log10(chain.link(i)) if chain.link(i) > 0 else math.nan for i in links])
        if not np.isfinite(logs).all():
            continue
        predicted = -0.5 * float(logs.sum()) * sign
        if predicted < needed_decades:
            continue
        # measured over the same links, forward (output RMS) and backward (output-gradient RMS, which
        # passes the same gains for square layers): biases put a floor under a decaying forward
        # signal, none under the backward one
        a, b = links[0], links[-1]
        predicted_ab = -0.5 * sign * float(sum(math.log10(chain.act_factor[i]) + math.log10(chain.gain[j])
                                               for i, j in zip(links[:-1], links[1:], strict=True)))
        measured = max(sign * _decades(chain.act_rms[a], chain.act_rms[b]),
                       sign * _decades(chain.out_grad_rms[b], chain.out_grad_rms[a]))
        if math.isfinite(measured) and predicted_ab > 0 and measured < 0.5 * predicted_ab:
            continue
        off = [view.layers[i] for i in links
               if (chain.link(i) < LINK_TOLERANCE if sign > 0 else chain.link(i) > 1 / LINK_TOLERANCE)]
        found = CompoundInit(layers=off, predicted_decades=sign * predicted, measured_decades=sign * measured,
                             median_link=float(10 ** np.median(logs)), depth=len(links))
        if off and (best is None or abs(found.predicted_decades) > abs(best.predicted_decades)):
            best = found
    return best


def _sequential_runs(chain: Chain, layers: list[int]) -> list[list[int]]:
    """``layers`` cut wherever the sampled backward signal shows that ``j`` does not feed ``i``.

    Depth order is the order layers *run*, not a data path: attention's query, key and value
    projections run one after another but side by side. Through a real link ``i -> j`` the
    gradient with respect to ``i``'s output is ``j``'s output gradient passed back through ``j``'s
    weights and ``i``'s activation, so its mean square is ``gain_j * act_factor_i`` times ``j``'s
    (biases add nothing backwards). A pair off that by more than ``SEQUENTIAL_TOLERANCE`` in
    either direction is not a link, and the compound gain is not multiplied across it; where the
    backward signal was not sampled the pair is kept.
    """
    runs: list[list[int]] = []
    current: list[int] = []
    g = chain.out_grad_rms
    for i in layers:
        if current:
            p = current[-1]
            expected = chain.gain[i] * chain.act_factor[p] * g[i] ** 2
            if math.isfinite(g[p]) and math.isfinite(expected) and g[p] > 0 and expected > 0:
                ratio = g[p] ** 2 / expected
                if not (1 / SEQUENTIAL_TOLERANCE <= ratio <= SEQUENTIAL_TOLERANCE):
                    runs.append(current)
                    current = []
        current.append(i)
    if current:
        runs.append(current)
    return runs


def _decades(x: float, y: float) -> float:
    """``log10(x / y)``; NaN when either is not a positive finite number."""
    ok = math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0
    return math.log10(x / y) if ok else math.nan


@dataclass(frozen=True)
class ResidualGrowth:
    """A forward signal that grows through additions (residual connections) nobody normalises."""

    branch_last_layers: list[str]   # the layer just before each addition: the last layer of each branch
    growth_decades: float           # measured forward growth, first to last layer (RMS decades)
    junction_decades: float         # the part of it the additions contribute
    mean_junction_ratio: float      # typical (input mean square) / (what the previous layer's output explains)

    def describe(self) -> str:
        return (f"the forward signal grows {self.growth_decades:.1f} orders of magnitude through "
                f"{len(self.branch_last_layers)} residual additions without normalisation: each adds a branch "
                f"output to the stream it was computed from (a layer's input is ~{self.mean_junction_ratio:.2g}x "
                "the variance the previous layer's output explains), so the stream's variance multiplies block "
                "after block")

    def evidence(self) -> dict[str, Any]:
        return {"residual_growth": {"growth_decades": round(self.growth_decades, 2),
                                    "junction_decades": round(self.junction_decades, 2),
                                    "mean_junction_ratio": round(self.mean_junction_ratio, 3),
                                    "additions": len(self.branch_last_layers)}}


def residual_growth(view: HistoryView, chain: Chain, th: Thresholds) -> ResidualGrowth | None:
    """Residual additions behind a forward signal that grows ``th.forward_growth_decades`` or more.

    A junction is a pair of consecutive plain layers ``i -> j`` (nothing normalising in between)
    where ``j``'s inferred input mean square, ``act_rms_j^2 / gain_j``, exceeds what ``i``'s output
    explains, ``act_rms_i^2 * act_factor_i``, by ``RESIDUAL_JUNCTION_RATIO`` or more. At least
    ``th.min_depth_layers`` such junctions are needed (one skip is an architecture, a stack of them
    compounding is the cause).
    """
    rms = chain.act_rms
    valid = np.flatnonzero(np.isfinite(rms) & (rms > 0))
    if len(valid) < th.min_depth_layers:
        return None
    logs = np.log10(rms[valid])
    q = max(1, len(valid) // 4)
    growth = float(np.median(logs[-q:]) - np.median(logs[:q]))
    if growth < 1.0:
        return None
    # junctions grouped by their place in the repeating block ("3.fc2 -> 4.fc1" is "#.fc2 -> #.fc1"):
    # one junction's ratio is noisy (a deep signal spans few directions), the median over the blocks is not
    groups: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for seg in chain.segments:
        for i, j in zip(seg[:-1], seg[1:], strict=False):
            if not (math.isfinite(rms[i]) and math.isfinite(rms[j]) and rms[i] > 0 and chain.gain[j] > 0):
                continue
            r = (rms[j] ** 2 / chain.gain[j]) / (rms[i] ** 2 * chain.act_factor[i])
            key = (_INDEX.sub("#", view.layers[i]), _INDEX.sub("#", view.layers[j]))
            groups.setdefault(key, []).append((i, r))
    last: list[str] = []
    ratios: list[float] = []
    for members in groups.values():
        median = float(np.median([r for _, r in members]))
        if median >= RESIDUAL_JUNCTION_RATIO:
            last += [view.layers[i] for i, _ in members]
            ratios += [median] * len(members)
    last = [n for n in view.layers if n in set(last)]  # depth order
    junction = 0.5 * float(np.sum(np.log10(ratios))) if ratios else 0.0
    if len(last) < max(2, th.min_depth_layers) or junction < 0.25 * growth:
        return None  # a few noisy junctions in a growth the weights make are not the cause
    if growth < 0.5 * math.log10(len(last) + 1) + ADDITIVE_MARGIN_DECADES:
        return None  # the variance adds up block by block (normalised branches): healthy
    return ResidualGrowth(branch_last_layers=last, growth_decades=growth, junction_decades=junction,
                          mean_junction_ratio=float(10 ** np.mean(np.log10(ratios))))


@dataclass(frozen=True)
class Cause:
    """What a rule needs from a compounding cause: the fixes, ranked; the sentence; the fix targets."""

    fixes: tuple[str, ...]
    text: str
    fix_layers: list[str]
    evidence: dict[str, Any]


def vanishing_cause(view: HistoryView, chain: Chain, needed_decades: float) -> Cause | None:
    """Compound under-initialisation predicting at least ``needed_decades`` of decay (half a measured
    vanishing, so that it explains most of it; or the whole threshold where the measured decay
    falls short of it): re-initialising comes first."""
    found = compound_init(view, chain, needed_decades, sign=1.0)
    if found is None:
        return None
    return Cause(fixes=("he_init", "insert_batchnorm", "residual"), text=found.describe(),
                 fix_layers=found.layers, evidence=found.evidence())


def exploding_cause(view: HistoryView, chain: Chain, th: Thresholds) -> Cause | None:
    """Residual additions without normalisation behind a growing forward signal (first), or a
    compound over-initialisation of a plain chain explaining ``th.forward_growth_decades``."""
    growth = residual_growth(view, chain, th)
    if growth is not None:
        evidence = growth.evidence()
        evidence["residual_growth"]["branch_last_layers"] = growth.branch_last_layers
        return Cause(fixes=("rescale_residual", "insert_batchnorm", "lower_lr"), text=growth.describe(),
                     fix_layers=growth.branch_last_layers, evidence=evidence)
    found = compound_init(view, chain, th.forward_growth_decades, sign=-1.0)
    if found is not None:
        return Cause(fixes=("he_init", "insert_batchnorm", "lower_lr"), text=found.describe(),
                     fix_layers=found.layers, evidence=found.evidence())
    return None


def recurrent_exploding_fixes(scale_invariant: bool | None) -> tuple[str, ...]:
    """Fixes for a recurrence that amplifies through time. Under SGD, clipping first (Pascanu et al.
    2013: it bounds every update while training shrinks the recurrent gain); under Adam-like
    optimizers, which are invariant to gradient scale, never clipping: the over-scaled recurrent
    matrix is the cause, and re-initialising it (or a gated cell) removes it."""
    if scale_invariant is True:
        return ("recurrent_init", "lstm_gru", "lower_lr")
    return ("clip_gradients", "recurrent_init", "lstm_gru", "lower_lr")


def attribute_symptoms(findings: list[Any], notes: list[str]) -> list[Any]:
    """Cause before symptom, across findings:

    - a non-finite finding that follows a residual growth gets its fix first (the exploding
      finding found the growth; the overflow is its consequence);
    - dead units fed by layers of a compound under-initialised chain are its symptom, not a second
      problem: where the signal has decayed to nothing the biases alone decide which units fire.
      They become a note; the chain's re-initialisation (which zeroes those biases) treats them.
    """
    from dataclasses import replace

    explode = next((f for f in findings if f.kind == "exploding" and "residual_growth" in f.evidence), None)
    compound = next((f for f in findings if f.kind == "vanishing" and "compound_init" in f.evidence), None)
    out = []
    for f in findings:
        if explode is not None and f.kind == "nonfinite" and "rescale_residual" not in f.fixes:
            evidence = {**f.evidence, "cause": explode.evidence.get("cause", ""),
                        "residual_growth": explode.evidence["residual_growth"]}
            f = replace(f, fixes=("rescale_residual", *f.fixes), evidence=evidence,
                        reasons=(fix_reason("nonfinite", "rescale_residual"), *f.reasons),
                        message=f.message.rstrip(".") + f"; cause: {explode.evidence.get('cause', '')}.")
        if compound is not None and f.kind == "dead_units":
            feeding = set(f.evidence.get("feeding_layers", ()))
            if feeding and feeding <= set(compound.evidence.get("fix_layers", ())):
                notes.append(f"dead units in {', '.join(f.layers[:3])}{'...' if len(f.layers) > 3 else ''} follow from "
                             "the compound decay of the signal (the biases alone decide which units fire): "
                             "re-initialising the chain treats them")
                continue
        out.append(f)
    return out
