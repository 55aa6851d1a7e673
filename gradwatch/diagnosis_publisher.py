"""Hands a watcher's diagnoses to its sinks, and renders their recommendation as code."""

from __future__ import annotations

import logging
from dataclasses import replace

from torch import nn

from gradwatch.findings import Diagnosis
from gradwatch.sinks import Sink
from gradwatch.structure import ModelStructure

log = logging.getLogger("gradwatch")


def with_fix_code(model: nn.Module, structure: ModelStructure, diag: Diagnosis) -> Diagnosis:
    """``diag`` with its recommendation as copy-pasteable code (a dry run: nothing changes); ``diag``
    itself when healthy, before the structure is known, or when rendering fails."""
    if diag.healthy or not structure:
        return diag
    try:
        from gradwatch.fixes import apply_fixes

        plan = apply_fixes(model, diag, dry_run=True)
        return replace(diag, code=plan.code)
    except Exception as exc:  # the recommendation text must never break a diagnosis
        log.debug("gradwatch: could not render fix code: %s", exc)
        return diag


class DiagnosisPublisher:
    """Writes diagnoses to the sinks: on the cadence only when the findings changed, at close always.

    Args:
        sinks: the sinks, shared with the watcher.
    """

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self._signature: tuple | None = None

    def publish(self, step: int, diag: Diagnosis) -> None:
        """Write ``diag`` if its findings differ from the last published ones."""
        sig = diag.signature()
        if sig != self._signature:
            self._signature = sig
            self.publish_final(step, diag)

    def publish_final(self, step: int, diag: Diagnosis) -> None:
        """Write ``diag`` whatever was published before (the run's last word)."""
        for sink in self.sinks:
            sink.write_diagnosis(step, diag)
