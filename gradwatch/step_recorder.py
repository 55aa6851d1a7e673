"""Records collected steps, once on the host, into the history and the sinks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradwatch.collect import StepStats
from gradwatch.history import History
from gradwatch.history_view import ActivationMeta, LayerMeta
from gradwatch.sinks import Sink, StepRecord
from gradwatch.step_buffer import BufferedStep


class StepRecorder:
    """Writes each step to the history, then to every sink, under the current layers and activations.

    Args:
        history: the run's history (the layers and activations get their columns there).
        sinks: the sinks, shared with the watcher (sinks added later receive later steps).
    """

    def __init__(self, history: History, sinks: list[Sink]):
        self.history = history
        self.sinks = sinks
        #: extra scalars (e.g. a clipping threshold) attached to every following step record
        self.extra: dict[str, float] = {}
        self._columns: list[int] = []
        self._act_columns: list[int] = []
        # the same lists go to the sinks until the layers change (no per-layer Python work per step);
        # sinks must not modify them
        self._layer_names: list[str] = []
        self._act_names: list[str] = []

    def set_layers(self, names: list[str], meta: list[LayerMeta], act_names: list[str],
                   act_meta: list[ActivationMeta]) -> None:
        """Record the following steps under these layers and activations (depth order)."""
        self._columns = self.history.register_layers(names, meta)
        self._act_columns = self.history.register_activations(act_names, act_meta)
        self._layer_names, self._act_names = list(names), list(act_names)

    def write(self, step: int, stats: StepStats, loss: float, act_values: np.ndarray | None = None,
              signal: np.ndarray | None = None) -> None:
        """Record one step; ``act_values`` and ``signal`` on activation-sampled steps."""
        values = stats.values.numpy()
        self.history.append_step(step, self._columns, values, stats.total_norm, loss)
        if act_values is not None:
            self.history.append_sample(step, self._act_columns, act_values, self._columns, signal)
        if self.sinks:
            record = StepRecord(
                step=step, layers=self._layer_names, values=values, total_norm=stats.total_norm,
                loss=loss, activations=self._act_names, act_values=act_values, signal=signal,
                extra=dict(self.extra),
            )
            for sink in self.sinks:
                sink.write_step(record)

    def write_batch(self, items: Sequence[BufferedStep]) -> None:
        """Record common steps (no activation sample) in one whole-array history append, then the sinks."""
        if not items:
            return
        values = np.stack([item.stats.values.numpy() for item in items])
        totals = [item.stats.total_norm for item in items]
        self.history.append_steps([item.step for item in items], self._columns, values, totals,
                                  [item.loss for item in items])
        if self.sinks:
            extra = dict(self.extra)
            for k, item in enumerate(items):
                record = StepRecord(step=item.step, layers=self._layer_names, values=values[k], total_norm=totals[k],
                                    loss=item.loss, activations=self._act_names, extra=extra)
                for sink in self.sinks:
                    sink.write_step(record)
