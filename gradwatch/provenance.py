"""Non-finite provenance: what led to the first NaN/Inf gradient, kept for the whole run.

Once every step of the recent window is NaN, the window can say *when* the trouble started but not
*why*. So at the first step with a non-finite gradient the evidence before it is frozen into a small
plain-data record (:func:`capture`, called by the history once per run, and by
``HistoryView.from_dataframe`` for logs), and the diagnosis names a cause from it (:func:`explain`,
pure, with the thresholds):

* ``loss_scale_overflow`` - fp16 loss scaling is on: an overflow is the scaler calibrating (the step
  is skipped and the scale halved), a problem only when it keeps happening;
* ``large_updates`` - the total gradient norm grew by orders of magnitude, or one optimizer step moved
  a layer by more than its own size, before the first NaN: the weights blew up;
* ``forward_overflow`` - the forward signal grew by orders of magnitude across depth (or to values
  near the float range) in the last activation sample before the NaN;
* ``nonfinite_loss`` - the loss was already NaN/Inf on that step while the gradients before were
  stable: the inputs, the targets or the loss computation (``log(0)``, ``0/0``) produced it;
* ``backward_op`` - the loss was finite and nothing grew: an op whose derivative is infinite at its
  input (``sqrt``, ``log``, ``pow``, a norm at 0) in or after the origin layer.

The *origin* is the non-finite layer nearest the loss: backward runs from the loss towards the
input, so on the first bad step the deepest non-finite layer is where the NaN entered the gradients.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gradwatch.metrics import GRAD, SIGNAL

if TYPE_CHECKING:
    from gradwatch.thresholds import Thresholds

#: steps before the first non-finite one whose evidence is kept
LOOKBACK = 20
#: forward-signal RMS this large is near float16 / bfloat16-sensitive ranges and far beyond a healthy
#: network's (about 1): an overflow in the making
_FORWARD_OVERFLOW_RMS = 1e4


class Window(Protocol):
    """The part of a ``gradwatch.history.HistoryView`` that :func:`capture` reads (this module sits
    below the history, which calls it, so it names the fields instead of importing the class)."""

    layers: list[str]
    steps: np.ndarray
    grad: np.ndarray
    total_norm: np.ndarray
    loss: np.ndarray
    sample_steps: np.ndarray
    signal: np.ndarray
    context: dict[str, Any]


def _finite(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[np.isfinite(a)]


def _round(x: float) -> float | None:
    return float(f"{x:.4g}") if x is not None and math.isfinite(x) else None


def _growth_decades(series: np.ndarray) -> float | None:
    """log10 of the last finite positive value over the median of the ones before it."""
    s = _finite(series)
    s = s[s > 0]
    if len(s) < 3:
        return None
    return float(math.log10(s[-1] / float(np.median(s[:-1]))))


def _loss_recorded(view: Window, before: np.ndarray) -> bool:
    """Whether losses are being recorded at all (a NaN loss then means a non-finite loss, not "not given")."""
    return bool(len(view.loss)) and bool(np.isfinite(np.asarray(view.loss)[before]).any())


def capture(view: Window, step: int, layers: list[str], lookback: int = LOOKBACK) -> dict[str, Any]:
    """The evidence around the first non-finite step ``step`` (plain data: fits a checkpoint, JSON).

    Args:
        view: a view holding the steps up to ``step`` (later steps are ignored).
        step: the first step with a non-finite gradient.
        layers: the layers whose gradient was non-finite on it.
        lookback: how many earlier steps to summarise.

    Returns:
        ``{"step", "nonfinite_layers" (depth order), "origin" (nearest the loss), "loss_at_step",
        "loss_before", "total_norm_before", "total_norm_growth_decades", "grew_most" (layers whose
        gradient norm grew most), "max_update_ratio" / "max_update_layer", "forward" (the last
        activation sample: ``step``, ``growth_decades`` across depth, ``max_rms``, ``largest_layer``),
        "amp_loss_scaling", "loss_scale"}``; ``None`` values where nothing was measured.
    """
    names = list(view.layers)
    depth = {n: i for i, n in enumerate(names)}
    bad = sorted((n for n in layers if n in depth), key=depth.__getitem__) or list(layers)
    steps = np.asarray(view.steps)
    at = np.flatnonzero(steps == step)
    before = np.flatnonzero(steps < step)[-lookback:]
    loss_at = float(view.loss[at[0]]) if len(at) and len(view.loss) > at[0] else math.nan
    tn_before = np.asarray(view.total_norm, dtype=np.float64)[before] if len(view.total_norm) else np.zeros(0)
    record: dict[str, Any] = {
        "step": int(step),
        "nonfinite_layers": bad[:20],
        "n_nonfinite_layers": len(bad),
        "origin": bad[-1] if bad else None,
        "loss_at_step": _round(loss_at),
        # None: no loss was recorded on that step (watcher.step(loss) gives it)
        "loss_finite_at_step": None if not len(at) or np.isnan(view.loss[at[0]]) and not _loss_recorded(view, before)
        else bool(math.isfinite(loss_at)),
        "loss_before": [_round(v) for v in _finite(view.loss[before])[-5:]] if len(view.loss) else [],
        "total_norm_before": [_round(v) for v in _finite(tn_before)[-5:]],
        "total_norm_growth_decades": _round(_growth_decades(tn_before)) if len(tn_before) else None,
        "grew_most": {},
        "max_update_ratio": None,
        "max_update_layer": None,
        "forward": None,
        "steps_before": int(len(before)),
        "amp_loss_scaling": bool(view.context.get("amp_loss_scaling")),
        "loss_scale": _round(float(view.context["loss_scale"])) if isinstance(view.context.get("loss_scale"), int | float) else None,
    }
    if len(before) and len(names):
        g = view.grad[before]
        growth = {}
        for i, name in enumerate(names):
            d = _growth_decades(g[:, i, GRAD["grad_norm"]])
            if d is not None and d > 0.3:
                growth[name] = d
        top = sorted(growth, key=growth.__getitem__, reverse=True)[:3]
        record["grew_most"] = {n: _round(growth[n]) for n in top}
        upd = g[:, :, GRAD["update_ratio"]].astype(np.float64)
        if np.isfinite(upd).any():
            flat = np.where(np.isfinite(upd), upd, -np.inf)
            t, i = np.unravel_index(int(np.argmax(flat)), flat.shape)
            record["max_update_ratio"] = _round(float(upd[t, i]))
            record["max_update_layer"] = names[i]
    samples = np.flatnonzero(np.asarray(view.sample_steps) <= step) if len(view.sample_steps) else np.zeros(0, dtype=int)
    if len(samples) and view.signal.shape[1] == len(names):
        s = samples[-1]
        rms = view.signal[s, :, SIGNAL["act_rms"]].astype(np.float64)
        ok = np.flatnonzero(np.isfinite(rms) & (rms > 0))
        if len(ok):
            logs = np.log10(rms[ok])
            record["forward"] = {
                "step": int(view.sample_steps[s]),
                "growth_decades": _round(float(logs[-1] - logs[0])) if len(ok) >= 2 else None,
                "max_rms": _round(float(rms[ok].max())),
                "largest_layer": names[int(ok[int(np.argmax(rms[ok]))])],
            }
    return record


def explain(record: dict[str, Any], th: Thresholds) -> tuple[str | None, str]:
    """``(cause, sentence)`` naming what led to the first non-finite gradient, from :func:`capture`'s
    record; ``cause`` is ``None`` when the evidence shows none (the sentence then lists what is known)."""
    step, origin = record.get("step"), record.get("origin")
    growth = record.get("total_norm_growth_decades")
    upd = record.get("max_update_ratio")
    fwd = record.get("forward") or {}
    loss_known = record.get("loss_finite_at_step")
    loss_bad = loss_known is False
    if record.get("amp_loss_scaling"):
        scale = record.get("loss_scale")
        return "loss_scale_overflow", (
            f"fp16 loss scaling is on{f' (scale {scale:g})' if scale else ''}: the first overflow at step {step} is "
            "the GradScaler calibrating (the step is skipped and the scale halved)")
    if (growth is not None and growth >= th.exploding_growth_decades) or (upd is not None and upd >= th.exploding_update_ratio):
        what = []
        if growth is not None and growth >= th.exploding_growth_decades:
            what.append(f"the total gradient norm grew {growth:.1f} orders of magnitude in the steps before")
        if upd is not None and upd >= th.exploding_update_ratio:
            what.append(f"one optimizer step moved {record.get('max_update_layer')} by {upd:.3g}x its own size")
        return "large_updates", (f"the updates were too large for the weights: {' and '.join(what)}; the first "
                                 f"non-finite gradient followed at step {step}, entering at {origin}")
    fwd_growth, fwd_max = fwd.get("growth_decades"), fwd.get("max_rms")
    if (fwd_growth is not None and fwd_growth >= th.forward_growth_decades) or (fwd_max is not None and fwd_max >= _FORWARD_OVERFLOW_RMS):
        return "forward_overflow", (
            f"forward overflow: at step {fwd.get('step')} the forward signal reached RMS {fwd_max:.3g} in "
            f"{fwd.get('largest_layer')}" + (f" ({fwd_growth:.1f} orders of magnitude across depth)" if fwd_growth else "")
            + f"; the first non-finite gradient followed at step {step}")
    if loss_bad:
        return "nonfinite_loss", (
            f"the loss was already NaN/Inf at step {step} while the gradients before were stable: the inputs, the "
            "targets or the loss computation (log(0), 0/0) produced it, not the gradients")
    if loss_known and record.get("steps_before"):
        return "backward_op", (
            f"the loss was finite at step {step} and nothing grew before it: an op whose derivative is infinite at its "
            f"input (sqrt, log, pow or a norm at 0) in or after {origin} put the first inf/NaN into the gradients")
    return None, f"first non-finite gradient at step {step}, entering at {origin}; no earlier evidence was recorded"
