"""A watcher's part in a cross-process reduction of its statistic rows (sharded parameters, FSDP).

The reduction is a collective: every rank must take part at every collected step. A watcher that
stopped -- it failed, or it learned that another rank's watcher did -- keeps taking part with zero rows
(``abstain()``) at every collected step for the rest of the run. The others learn of a failure from the
reduced rows when they read them on the host, which on an accelerator happens a step or more later
(reading it at once would make the host wait for the device at every reduction); since nobody ever
stops joining, nobody is left waiting in a collective, however late each rank reads the news.
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
        self.abstaining = False  # stopped: takes part with zero rows at every collected step

    def begin_step(self) -> None:
        """A new collected step: its rows have not been reduced yet."""
        self._reduced = False

    def reduce(self, partials: list[DeviceRows]) -> list[DeviceRows]:
        """``partials`` with their rows reduced across processes (unchanged without a reducer). A rank
        without gradients on this step still takes part in a collective one, with zero rows
        (``join_empty()``): the others would otherwise wait for it."""
        if self.reducer is None:
            return partials
        self._reduced = True  # (a reducer that raises has taken part in the collective)
        if not partials:
            join_empty = getattr(self.reducer, "join_empty", None)
            if callable(join_empty):
                join_empty()
            return partials
        return [p._replace(rows=self.reducer(p.rows)) for p in partials]

    def note_failure(self) -> None:
        """The watcher stopped (its own failure or a peer's): take part with zero rows from now on, at
        this collected step already if its rows have not been reduced yet."""
        if not callable(getattr(self.reducer, "abstain", None)):
            return
        self.abstaining = True
        if not self._reduced:
            self.abstain()

    def abstain(self) -> None:
        """Take part in this collected step's reduction with zero rows."""
        self._reduced = True
        try:
            self.reducer.abstain()
        except Exception as exc:  # the collective itself broke: nothing more to take part in
            self.abstaining = False
            log.debug("gradwatch: the reduction taken part in after a failure raised: %s", exc)
