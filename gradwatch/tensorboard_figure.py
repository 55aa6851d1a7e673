"""The gradient-flow figure of the recent steps (mean and max |g| per layer, in depth order) as a
TensorBoard image."""

from __future__ import annotations

import warnings
from collections import deque
from typing import TYPE_CHECKING

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary

from gradwatch.metrics import GRAD

if TYPE_CHECKING:
    from gradwatch.findings import Diagnosis


class RecentFlow:
    """The last ``window`` steps' per-layer gradient statistics, rendered on demand.

    Args:
        window: steps kept (the diagnosis window: the figure shows what the diagnosis saw).
    """

    def __init__(self, window: int):
        self._recent: deque[tuple[int, list[str], np.ndarray]] = deque(maxlen=int(window))

    def add(self, step: int, layers: list[str], values: np.ndarray) -> None:
        """Keep a step's values (``values[i]`` follows ``GRAD_METRICS`` for ``layers[i]``)."""
        self._recent.append((step, layers, values))

    def __bool__(self) -> bool:
        return bool(self._recent)

    def image(self, step: int, diagnosis: Diagnosis | None) -> Summary.Image:
        """The figure of the kept steps up to ``step``, flagged and titled with ``diagnosis``, as a PNG."""
        from gradwatch.figure import diagnosis_flags, figure_to_png, gradient_flow_figure, verdict

        layers, mean, mx = self._profile()
        v = verdict(diagnosis)
        first = self._recent[0][0]
        span = f"steps {first}-{step}" if first != step else f"step {step}"
        fig = gradient_flow_figure(layers, mean, mx, flags=diagnosis_flags(diagnosis),
                                   title=f"gradient flow ({span})" + (f": {v}" if v else ""))
        png = figure_to_png(fig)
        w, h = (int(v) for v in fig.canvas.get_width_height())
        return Summary.Image(height=h, width=w, colorspace=4, encoded_image_string=png)

    def _profile(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Per-layer medians of mean|g| and max|g| over the kept steps (layers of the latest step)."""
        layers = self._recent[-1][1]
        index = {n: i for i, n in enumerate(layers)}
        mean = np.full((len(self._recent), len(layers)), np.nan)
        mx = np.full_like(mean, np.nan)
        for t, (_, names, values) in enumerate(self._recent):
            cols = [index.get(n, -1) for n in names]
            for j, c in enumerate(cols):
                if c >= 0:
                    mean[t, c] = values[j, GRAD["grad_mean_abs"]]
                    mx[t, c] = values[j, GRAD["grad_max_abs"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return layers, np.nanmedian(mean, axis=0), np.nanmedian(mx, axis=0)
