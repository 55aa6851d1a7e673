"""A watcher's part in a cross-process reduction of its statistic rows (sharded parameters, FSDP).

The reduction is a collective: every rank must take part at the same collected step. A watcher that
failed still owes the others its part at the next step they reduce at; it takes part with zero rows
(``abstain()``), so that they learn it failed and stop there too instead of waiting for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from gradwatch.hotpath import DeviceRows

log = logging.getLogger("gradwatch")


class RowReduction:
    """Runs the optional row reducer on a collected step and keeps track of the part owed after a failure.

    Attributes:
        reducer: ``fn(rows) -> rows`` (see ``collect.reduce_sharded_rows``), or ``None``. A collective
            one also has ``abstain()``.
    """

    def __init__(self) -> None:
        self.reducer: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._reduced = False  # this collected step's rows went through the reducer
        self.owed = False  # failed before taking part in the next reduction

    def begin_step(self) -> None:
        """A new collected step: its rows have not been reduced yet."""
        self._reduced = False

    def reduce(self, partials: list[DeviceRows]) -> list[DeviceRows]:
        """``partials`` with their rows reduced across processes (unchanged without a reducer)."""
        if self.reducer is None:
            return partials
        self._reduced = True  # (a reducer that raises has taken part in the collective)
        return [p._replace(rows=self.reducer(p.rows)) for p in partials]

    def note_failure(self) -> None:
        """The watcher failed (not because a peer did): the other ranks reduce at this step, if this one
        has not yet, or at the next collected one; take part there."""
        if not callable(getattr(self.reducer, "abstain", None)):
            return
        self.owed = True
        if not self._reduced:
            self.abstain()

    def abstain(self) -> None:
        """Take part in the reduction owed with zero rows."""
        self.owed = False
        self._reduced = True
        try:
            self.reducer.abstain()
        except Exception as exc:  # the collective itself broke: nothing more to take part in
            log.debug("gradwatch: the reduction taken part in after a failure raised: %s", exc)
