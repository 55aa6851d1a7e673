"""The gradient-flow figure: mean and max |gradient| per layer, input to output, on a log scale.

The classic picture for spotting vanishing or exploding gradients: one pair of bars per layer in
depth order; a vanishing network shows bars shrinking by orders of magnitude towards the input.
Layers the diagnosis flags are highlighted (vanishing blue, exploding red, non-finite purple).

Drawn with matplotlib's object API on an Agg canvas: no display, no pyplot global state, and the
user's matplotlib backend is left alone. Usable on its own::

    fig = gradwatch.figure.figure_from_dataframe(watcher.to_dataframe(), watcher.diagnose())
    gradwatch.figure.save_figure(fig, "gradient_flow.png")
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullLocator

if TYPE_CHECKING:
    from gradwatch.findings import Diagnosis

TOTAL_LAYER = "(total)"
_COLORS = {"vanishing": "#1f77b4", "exploding": "#d62728", "nonfinite": "#9467bd"}
_MEAN_COLOR = "#333333"
_MAX_COLOR = "#bdbdbd"
_LABEL_CHARS = 28


def _positive(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def _decade(value: float, _pos: int) -> str:
    return f"1e{round(math.log10(value)):+03d}" if value > 0 else ""


def _short(name: str) -> str:
    return name if len(name) <= _LABEL_CHARS else "..." + name[-(_LABEL_CHARS - 3):]


def gradient_flow_figure(
    layers: Sequence[str],
    mean_abs: Sequence[float],
    max_abs: Sequence[float],
    *,
    flags: Mapping[str, Iterable[str]] | None = None,
    title: str | None = None,
) -> Figure:
    """Draw mean and max |g| per layer (in the order given: pass depth order) on a log scale.

    Args:
        layers: layer names, input to output.
        mean_abs: mean |g| per layer (NaN or <= 0: drawn as "no gradient").
        max_abs: max |g| per layer.
        flags: per layer the finding kinds that concern it (``"vanishing"``, ``"exploding"``,
            ``"nonfinite"`` are highlighted; others are ignored).
        title: figure title.

    Returns:
        A matplotlib ``Figure`` attached to an Agg canvas (save it with :func:`save_figure`).

    Raises:
        ValueError: the three sequences differ in length.
    """
    n = len(layers)
    if len(mean_abs) != n or len(max_abs) != n:
        raise ValueError(f"gradient_flow_figure: got {n} layers, {len(mean_abs)} mean values and {len(max_abs)} max values")
    mean, mx = _positive(mean_abs), _positive(max_abs)
    width = min(24.0, max(6.0, 0.32 * n + 2.5))
    labels = [_short(name) for name in layers]
    # fixed margins sized for the rotated layer names (constrained layout costs ~10x the drawing)
    label_in = 0.075 * max((len(label) for label in labels), default=1) + 0.7
    height = 3.6 + label_in
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=1.0 / width, right=1 - 0.2 / width, top=1 - 0.75 / height, bottom=label_in / height)
    ax = fig.add_subplot()
    flags = {k: set(v) for k, v in (flags or {}).items()}
    kind_of = {}
    for name in layers:
        for kind in ("nonfinite", "exploding", "vanishing"):
            if kind in flags.get(name, ()):
                kind_of[name] = kind
                break
    finite = np.concatenate([mean[np.isfinite(mean)], mx[np.isfinite(mx)]])
    ax.set_yscale("log")
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (1e-3, 1.0)
    bottom = lo / 4
    ax.set_ylim(bottom, hi * 4)
    # one collection per kind of artist (hundreds of bar patches and spans cost seconds to draw)
    for kind in ("vanishing", "exploding", "nonfinite"):
        idx = [i for i, name in enumerate(layers) if kind_of.get(name) == kind]
        if idx:
            spans = [[(i - 0.5, 0), (i - 0.5, 1), (i + 0.5, 1), (i + 0.5, 0)] for i in idx]
            ax.add_collection(PolyCollection(spans, facecolors=_COLORS[kind], alpha=0.15, linewidths=0,
                                             transform=ax.get_xaxis_transform(), gid=f"highlight_{kind}"))
    for values, half, color, gid in ((mx, 0.4, _MAX_COLOR, "max_bars"), (mean, 0.225, _MEAN_COLOR, "mean_bars")):
        bars = [[(i - half, bottom), (i - half, v), (i + half, v), (i + half, bottom)] for i, v in enumerate(values) if math.isfinite(v)]
        ax.add_collection(PolyCollection(bars, facecolors=color, linewidths=0, gid=gid))
    missing = [i for i in range(n) if not math.isfinite(mean[i]) and not math.isfinite(mx[i])]
    if missing:
        ax.plot(missing, [lo / 2] * len(missing), "x", color="#7f7f7f", label="no gradient")
    if not len(finite):
        ax.text(0.5, 0.5, "no gradient recorded", transform=ax.transAxes, ha="center", va="center")
    step = max(1, math.ceil(n / 60))
    shown = list(range(0, n, step))
    ax.set_xticks(shown)
    ax.set_xticklabels([labels[i] for i in shown], rotation=90, fontsize=8 if n > 20 else 9)
    for tick, i in zip(ax.get_xticklabels(), shown, strict=True):
        if layers[i] in kind_of:
            tick.set_color(_COLORS[kind_of[layers[i]]])
    ax.yaxis.set_minor_locator(NullLocator())  # a tick object per minor tick: ~40 % of the drawing time
    ax.yaxis.set_major_formatter(FuncFormatter(_decade))  # plain "1e-05": no mathtext parsing
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("layer (input \u2192 output)")
    ax.set_ylabel("|gradient|")
    ax.grid(axis="y", which="major", alpha=0.3)
    handles = [Patch(color=_MAX_COLOR, label="max |g|"), Patch(color=_MEAN_COLOR, label="mean |g|")]
    handles += ax.get_legend_handles_labels()[0]
    handles += [Patch(color=_COLORS[k], alpha=0.3, label=f"{k} layer") for k in ("vanishing", "exploding", "nonfinite")
                if k in kind_of.values()]
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(handles), fontsize=8,
              frameon=False, borderaxespad=0.2, handlelength=1.2, columnspacing=1.0)
    fig.suptitle(title or "gradient flow", x=1.0 / width, y=1 - 0.08 / height, ha="left", va="top", fontsize=11)
    return fig


def diagnosis_flags(diagnosis: Diagnosis | None) -> dict[str, set[str]]:
    """Per layer name, the finding kinds that concern it (from the findings and the per-layer table)."""
    if diagnosis is None:
        return {}
    out: dict[str, set[str]] = {row.name: set(row.flags) for row in diagnosis.layers}
    for f in diagnosis.findings:
        for name in f.layers:
            out.setdefault(name, set()).add(f.kind)
    return out


def verdict(diagnosis: Diagnosis | None) -> str:
    """``"healthy"`` or the findings as ``kind (severity)``; empty without a diagnosis."""
    if diagnosis is None:
        return ""
    if diagnosis.healthy:
        return "healthy"
    return ", ".join(f"{f.kind} ({f.severity})" for f in diagnosis.findings)


def figure_from_diagnosis(diagnosis: Diagnosis, title: str | None = None, *, name: str | None = None) -> Figure:
    """The figure of a :class:`~gradwatch.Diagnosis`: its per-layer medians and its flagged layers.

    Args:
        diagnosis: e.g. ``watcher.diagnose()`` or ``RunLog.diagnose()``.
        title: the whole title; default ``"[name: ]gradient flow (steps a-b): verdict"``.
        name: a run name to start the default title with.
    """
    rows = list(diagnosis.layers)
    span = f" (steps {diagnosis.steps[0]}-{diagnosis.steps[1]})" if diagnosis.steps else ""
    default = (f"{name}: " if name else "") + f"gradient flow{span}: {verdict(diagnosis)}"
    return gradient_flow_figure(
        [r.name for r in rows], [r.grad_mean_abs for r in rows], [r.grad_max_abs for r in rows],
        flags=diagnosis_flags(diagnosis), title=title or default,
    )


def layer_profile(df: pd.DataFrame, last: int | None = 50) -> pd.DataFrame:
    """Median mean|g| and max|g| per layer over the ``last`` steps of a long-format frame, depth order.

    Returns a frame indexed by layer with columns ``grad_mean_abs`` and ``grad_max_abs``.
    """
    rows = df[(df["layer"] != TOTAL_LAYER) & df["metric"].isin(("grad_mean_abs", "grad_max_abs"))]
    if last is not None and len(rows):
        keep = np.sort(rows["step"].unique())[-last:]
        rows = rows[rows["step"].isin(keep)]
    if not len(rows):
        return pd.DataFrame(columns=["grad_mean_abs", "grad_max_abs"], dtype=float)
    if "depth" in rows.columns:
        order = rows.groupby("layer", sort=False)["depth"].min().sort_values(kind="stable").index
    else:
        order = pd.Index(pd.unique(rows["layer"]))
    wide = rows.pivot_table(index="layer", columns="metric", values="value", aggfunc="median")
    wide = wide.reindex(index=order, columns=["grad_mean_abs", "grad_max_abs"])
    return wide


def figure_from_dataframe(
    df: pd.DataFrame, diagnosis: Diagnosis | None = None, *, last: int | None = 50, title: str | None = None
) -> Figure:
    """The figure of a long-format history (``watcher.to_dataframe()`` or :func:`gradwatch.logs.read_run`).

    Args:
        df: columns ``step, layer, metric, value`` (and optionally ``depth``, which orders layers).
        diagnosis: optional; its flagged layers are highlighted.
        last: use the medians over this many most recent steps (``None``: all).
        title: figure title.
    """
    prof = layer_profile(df, last)
    if title is None:
        steps = df.loc[df["metric"] == "grad_mean_abs", "step"]
        span = f" (steps {int(steps.min())}-{int(steps.max())})" if len(steps) else ""
        v = verdict(diagnosis)
        title = f"gradient flow{span}" + (f": {v}" if v else "")
    return gradient_flow_figure(
        [str(n) for n in prof.index], prof["grad_mean_abs"].tolist(), prof["grad_max_abs"].tolist(),
        flags=diagnosis_flags(diagnosis), title=title,
    )


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure (what TensorBoard's image summary stores)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> None:
    """Write a figure as PNG."""
    with open(path, "wb") as fh:
        fh.write(figure_to_png(fig, dpi))


__all__ = [
    "diagnosis_flags", "verdict", "figure_from_dataframe", "figure_from_diagnosis", "figure_to_png", "gradient_flow_figure", "layer_profile", "save_figure",
]
