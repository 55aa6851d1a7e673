"""Where collected statistics go besides the in-memory history. Sinks never touch the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from gradwatch.findings import Diagnosis
    from gradwatch.history import History
    from gradwatch.layers import LayerInfo
    from gradwatch.thresholds import Thresholds


@dataclass
class StepRecord:
    """One collected step as the sinks see it (host data, depth order).

    Attributes:
        step: the step number (collected-step counter, or the trainer's global step).
        layers: layer names in depth order; ``values[i]`` follows ``GRAD_METRICS``.
        total_norm: global gradient L2 norm over all watched layers.
        loss: the loss passed to ``step()``, or NaN.
        activations: activation names with ``act_values[i]`` following ``ACT_METRICS`` (sampled steps).
        signal: per layer ``LAYER_SIGNAL_METRICS`` (sampled steps), else ``None``.
        extra: other scalars (e.g. ``clip_threshold``).
    """

    step: int
    layers: list[str]
    values: np.ndarray
    total_norm: float
    loss: float = float("nan")
    activations: list[str] = field(default_factory=list)
    act_values: np.ndarray | None = None
    signal: np.ndarray | None = None
    extra: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Sink(Protocol):
    """What the watcher calls. Every method must be cheap or on a cadence, and must not raise."""

    def write_step(self, record: StepRecord) -> None:
        """Called on every collected step, after the statistics reached the host."""

    def write_histograms(self, step: int, layers: list[LayerInfo]) -> None:
        """Called on histogram steps while the gradients are still live on their device, with the
        layers due on this step (a round can be spread over consecutive steps: the watcher's
        ``histogram_max_elements``)."""

    def write_diagnosis(self, step: int, diagnosis: Diagnosis) -> None:
        """Called when the diagnosis is recomputed (on its cadence and at close)."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class RunSource(Protocol):
    """What a sink may read from the run that feeds it (a ``GradWatcher`` is one), so that sinks
    depend on this protocol and not on the watcher.

    Attributes:
        name: the run's label.
        thresholds: the diagnosis thresholds (their ``window`` sizes a sink's recent-steps view).
        figure_every_n_steps: the gradient-flow figure cadence (0: only at close).
        every_n_steps, activation_every_n_steps, slow_stats_every_n, histogram_every_n_steps:
            the collection cadences, recorded in the run's metadata.
    """

    name: str
    thresholds: Thresholds
    figure_every_n_steps: int
    every_n_steps: int
    activation_every_n_steps: int
    slow_stats_every_n: int
    histogram_every_n_steps: int

    @property
    def history(self) -> History:
        """The recorded steps and the run's layer and activation metadata and context."""

    def record_pending(self) -> None:
        """Record the buffered steps now (history and sinks): a sink calls it at interpreter exit."""
