"""``StepBuffer``: the one place recorded steps wait between the hot path and the history and sinks.

A common collected step (every layer measured, all finite, no slow statistics, sample, histogram or
diagnosis due) is not recorded at once: recording a batch of them is one whole-array history append
instead of per-step work. The buffer is bounded (full: the owner records it) and owned by the
watcher, which records it before anything reads the results (history, diagnosis, close, a change of
layers or extra scalars) and at interpreter exit (through the sinks' ``RunSource.record_pending``).
Sinks hold nothing back: they hand each step to their writer as it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradwatch.collect import StepStats


@dataclass(frozen=True)
class BufferedStep:
    """A common step waiting to be recorded."""

    step: int
    stats: StepStats
    loss: float


class StepBuffer:
    """A bounded batch of common steps, taken whole by its owner.

    Args:
        capacity: steps kept before :attr:`full` (the owner then records them).
    """

    def __init__(self, capacity: int = 10):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self.capacity = capacity
        self._steps: list[BufferedStep] = []

    def add(self, step: int, stats: StepStats, loss: float) -> None:
        self._steps.append(BufferedStep(step, stats, loss))

    @property
    def full(self) -> bool:
        return len(self._steps) >= self.capacity

    def take(self) -> list[BufferedStep]:
        """Every buffered step, oldest first; the buffer is empty afterwards."""
        steps, self._steps = self._steps, []
        return steps

    def __len__(self) -> int:
        return len(self._steps)


__all__ = ["BufferedStep", "StepBuffer"]
