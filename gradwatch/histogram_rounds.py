"""Which layers get a gradient histogram on which collected step.

A round of histograms starts every ``every_n_steps`` collected steps and is spread over the steps
that follow, in depth order, at most ``max_elements`` gradient elements binned on one step, so that
binning a large model never stalls a single step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradwatch.layers import LayerInfo


class HistogramRounds:
    """The schedule of histogram rounds: when one starts and which layers are due on each step.

    Args:
        every_n_steps: a round starts every n-th collected step (0: never).
        max_elements: at most this many gradient elements are binned on one step, raised as needed
            so a round ends within ``every_n_steps``; ``None``: every layer on the round's first step.
    """

    def __init__(self, every_n_steps: int, max_elements: int | None):
        self.every_n_steps = every_n_steps
        self.max_elements = max_elements
        self._due: list[LayerInfo] = []  # layers of the current round not binned yet
        self._round_size = 0  # gradient elements of the current round

    @property
    def in_progress(self) -> bool:
        """A round has layers not binned yet."""
        return bool(self._due)

    def starts_at(self, index: int, writable: bool) -> bool:
        """Whether collected step ``index`` starts a round (only where a sink can write one)."""
        return bool(self.every_n_steps and writable) and index % self.every_n_steps == 0

    def start(self, layers: list[LayerInfo]) -> None:
        """Start a round over ``layers`` unless one is unfinished (that one is finished first)."""
        if not self._due:
            self._due = list(layers)
            self._round_size = sum(layer.numel for layer in layers)

    def next_layers(self, current: list[LayerInfo]) -> list[LayerInfo]:
        """The layers binned on this step: in depth order, up to the element budget (at least one
        layer); layers not in ``current`` (they left the model since the round started) are skipped."""
        present = {id(layer) for layer in current}
        due = [layer for layer in self._due if id(layer) in present]
        budget = self.max_elements
        if budget is None:
            self._due = []
            return due
        # a round must end within the cadence however large the model: greedy packing needs at most
        # 2 * total / budget + 1 steps
        budget = max(budget, math.ceil(2 * self._round_size / max(1, self.every_n_steps)))
        taken, size = 0, 0
        for layer in due:
            if taken and size + layer.numel > budget:
                break
            size += layer.numel
            taken += 1
        self._due = due[taken:]
        return due[:taken]
