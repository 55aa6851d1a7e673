"""``fail_on``: stop a Trainer with :class:`GradientHealthError` when a named finding appears.

The decision is taken at points that depend only on the optimizer-step count (the same on every
rank) and reduced across ranks, so every process stops at the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gradwatch.findings import Diagnosis

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from gradwatch.integrations.lightning_amp import AmpUnscaler
    from gradwatch.watcher import GradWatcher


class GradientHealthError(RuntimeError):
    """Raised by ``GradWatchCallback`` when a finding named in ``fail_on`` appears."""

    def __init__(self, message: str, diagnosis: Diagnosis | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.diagnosis = diagnosis
        self.step = step


class FailOn:
    """Checks the findings named in ``kinds``: ``"nonfinite"`` on every collected step, the others on the
    diagnosis cadence (every ``diagnose_every`` collected steps) and at epoch ends.

    Args:
        kinds: finding kinds that stop training.
        diagnose: computes (and keeps) the current diagnosis.
    """

    def __init__(self, kinds: tuple[str, ...], diagnose: Callable[[], Diagnosis]) -> None:
        self.kinds = kinds
        self.diagnose = diagnose
        #: Non-finite steps already judged (saved in checkpoints).
        self.seen_nonfinite = 0

    def on_step(self, trainer: Trainer, watcher: GradWatcher, step: int, on_cadence: bool,
                unscale: AmpUnscaler | None) -> None:
        """After a collected optimizer step (``on_cadence``: the diagnosis is due)."""
        per_step = "nonfinite" in self.kinds
        if not (per_step or on_cadence):
            return
        stop, reason, diag = False, "", None
        if per_step and watcher.history.nonfinite_steps > self.seen_nonfinite:
            self.seen_nonfinite = watcher.history.nonfinite_steps
            stop, reason = (True, "") if unscale is None else unscale.nonfinite_is_real()
        if on_cadence and not stop and watcher.history.total_steps:
            diag = self.diagnose()
            stop = bool(self.failing(diag, unscale))
        self.decide(trainer, watcher, diag, step, stop, reason)

    def failing(self, diag: Diagnosis, unscale: AmpUnscaler | None) -> list[Any]:
        # Under AMP loss scaling an occasional inf step is calibration: "nonfinite" is decided per
        # step from the loss scale, not from the diagnosis.
        return [f for f in diag.findings if f.kind in self.kinds and not (f.kind == "nonfinite" and unscale is not None)]

    def decide(self, trainer: Trainer, watcher: GradWatcher | None, diag: Diagnosis | None, step: int, stop: bool,
               reason: str = "") -> None:
        """Stop on every rank if any rank wants to (a collective: every rank must call it at the same step).

        Raises:
            GradientHealthError: naming the findings (or the reason) and how to keep training.
        """
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if not stop:
            return
        if diag is None and watcher is not None and watcher.history.total_steps:
            diag = self.diagnose()
        found = [f for f in (diag.findings if diag is not None else ()) if f.kind in self.kinds]
        what = "; ".join(f"{f.kind} ({f.severity}) in {', '.join(f.layers[:4]) or 'the model'}: {f.message}" for f in found)
        what = "; ".join(x for x in (what, reason) if x) or "a finding named in fail_on appeared on another rank"
        message = (
            f"gradwatch stopped training at step {step}: {what} "
            f"(GradWatchCallback(fail_on={self.kinds!r}); remove the kind from fail_on to keep training)"
        )
        raise GradientHealthError(message, diagnosis=diag, step=step)


__all__ = ["FailOn", "GradientHealthError"]
