"""Auto-apply fixes during training, verify that they helped, roll back those that did not.

The :class:`AutoFixer` rides on a watcher's step callbacks:

1. **probe** — wait ``probe_steps`` collected steps, then diagnose. Healthy: nothing happens, ever.
2. **apply once** — snapshot model and optimizer (bitwise, module tree included), apply the
   allowed fixes of the confirmed findings (:func:`gradwatch.fixes.apply_fixes`, optimizer told
   about new parameters with ``add_param_group``, other parameters' state kept).
3. **verify** — train on for ``verify_steps`` collected steps; compare the median loss of the
   verification window with the probe window (when losses are passed to ``watcher.step(loss)``)
   and the gradient flow (the findings the fix targeted must not get worse, and no layer may lose
   its gradient altogether — silencing a layer also "removes" its vanishing). Worse: restore the
   snapshot (the fix and the verification window are undone) — recorded either way.

Fixes that cap gradients (``Fix.caps_gradients``: ``clip_gradients``) are verified like every other fix,
on a cycle of their own: once the probe cycle is over, a diagnosis whose finding of a kind they treat
recommends one (under an Adam-like optimizer, which is invariant to gradient scale, only where it ranks
first) installs it with a snapshot, trains ``verify_steps`` and removes it again (model and optimizer
restored) when the loss or the gradient flow got worse.

The auto-fixer drives any :class:`FixableRun` (a :class:`~gradwatch.GradWatcher` is one): it does not
import the watcher module, which creates it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from gradwatch.findings import Diagnosis
from gradwatch.fixes.registry import get_fix_class, gradient_cappers, structural_fixes
from gradwatch.history import History
from gradwatch.thresholds import Thresholds

log = logging.getLogger("gradwatch")


def __getattr__(name: str) -> Any:
    """``STRUCTURAL``: deprecated, derived from the fixes' ``effect`` (use
    ``gradwatch.fixes.registry.structural_fixes()``)."""
    if name == "STRUCTURAL":
        return structural_fixes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FixableRun(Protocol):
    """What the auto-fixer needs of a watched run (:class:`~gradwatch.GradWatcher` provides it)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    thresholds: Thresholds
    collected: int
    diagnose_every_n_steps: int
    sinks: list[Any]

    @property
    def history(self) -> History: ...

    def diagnose(self, thresholds: Thresholds | None = None) -> Diagnosis: ...

    def add_step_callback(self, fn: Callable[[Any, int], None]) -> None: ...

    def relayer(self) -> None: ...

    def set_scalar(self, name: str, value: float) -> None: ...


@dataclass
class AutoFixEvent:
    """One thing the auto-fixer did: ``action`` is applied / kept / rolled_back / clipping / nothing."""

    step: int
    action: str
    detail: str
    report: Any = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "action": self.action, "detail": self.detail, "evidence": self.evidence,
                "report": self.report.to_dict() if self.report is not None else None}


def _median_loss(watcher: FixableRun, last: int) -> float:
    loss = watcher.history.view(last=last).loss
    loss = loss[np.isfinite(loss)]
    return float(np.median(loss)) if len(loss) else math.nan


def _silent_layers(diag: Diagnosis) -> int:
    """Layers whose gradient is exactly zero or absent: a fix that silences layers is not a cure."""
    return sum(1 for row in diag.layers if not (math.isfinite(row.grad_norm) and row.grad_norm > 0))


def _severity_score(diag: Diagnosis, kinds: set[str]) -> float:
    """How bad the targeted findings are: decades of vanishing, plus 10 per critical finding."""
    score = 0.0
    for f in diag.findings:
        if f.kind in kinds:
            score += 1.0 + (10.0 if f.severity == "critical" else 0.0) + float(f.evidence.get("decades", 0.0) or 0.0)
    return score


class AutoFixer:
    """Applies allowed fixes once after a probe window, verifies, and rolls back what made things worse.

    Args:
        watcher: the watcher whose model and optimizer to fix (needs ``optimizer=`` to add parameters).
        allowed: fix names that may be applied.
        probe_steps: collected steps to observe before deciding.
        verify_steps: collected steps to train on before judging a structural fix.
        loss_tolerance: relative loss increase tolerated in verification (noise).
        options: per-fix options passed to ``apply_fixes``.
        example_input: one batch of inputs, for fixes that initialise from batch statistics.
    """

    def __init__(
        self,
        watcher: FixableRun,
        allowed: tuple[str, ...],
        probe_steps: int = 50,
        verify_steps: int = 50,
        loss_tolerance: float = 0.05,
        options: dict[str, dict[str, Any]] | None = None,
        example_input: Any = None,
    ):
        for name, value in (("probe_steps", probe_steps), ("verify_steps", verify_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AutoFixer {name} must be an integer >= 1, got {value!r}")
        self.watcher = watcher
        self.allowed = tuple(allowed)
        #: the allowed fixes verified on their own cycle, when a finding ranks them (``Fix.caps_gradients``)
        self._cappers = tuple(n for n in self.allowed if n in gradient_cappers())
        self.probe_steps = probe_steps
        self.verify_steps = verify_steps
        self.loss_tolerance = loss_tolerance
        self.options = options
        self.example_input = example_input
        self.events: list[AutoFixEvent] = []
        self.state = "probing"
        self._snapshot: Any = None
        self._applied_at = 0
        self._before_loss = math.nan
        self._before_score = 0.0
        self._before_silent = 0
        self._kinds: set[str] = set()
        self._clipping = False
        self._installed: list[Any] = []  # live hooks installed by the fix being verified
        watcher.add_step_callback(self.on_step)

    # -- the state machine ---------------------------------------------------------------------
    def on_step(self, watcher: FixableRun, step: int) -> None:
        if self.state == "probing" and watcher.collected + 1 >= self.probe_steps:
            self._decide(step)
        elif self.state == "verifying" and watcher.collected + 1 - self._applied_at >= self.verify_steps:
            self._verify(step)
        if self._cappers and not self._clipping and self.state != "verifying" and \
                self.state != "probing" and watcher.diagnose_every_n_steps and \
                (watcher.collected + 1) % max(1, min(watcher.diagnose_every_n_steps, self.probe_steps)) == 0:
            self._maybe_clip(step)

    def _decide(self, step: int) -> None:
        from gradwatch.fixes import apply_fixes, snapshot

        w = self.watcher
        diag = self.agree(w.diagnose(w.thresholds.updated(window=self.probe_steps)))
        structural_or_init = tuple(f for f in self.allowed if f not in self._cappers)
        if diag.healthy or not structural_or_init:
            self.state = "done"
            self._event(step, "nothing", "healthy after the probe window" if diag.healthy else
                        f"no fix allowed besides {', '.join(self._cappers)}")
            return
        self._kinds = {f.kind for f in diag.findings}
        self._before_loss = _median_loss(w, self.probe_steps)
        self._before_score = _severity_score(diag, self._kinds)
        self._before_silent = _silent_layers(diag)
        self._snapshot = snapshot(w.model, w.optimizer)
        report = apply_fixes(w.model, diag, optimizer=w.optimizer, only=structural_or_init,
                             example_input=self.example_input, options=self.options)
        if not report.changed:
            self._snapshot = None
            self.state = "done"
            self._event(step, "nothing", "no allowed fix applied: " + "; ".join(
                f"{c.fix}: {c.reason}" for c in report.changes if c.status == "refused")[:500], report)
            return
        self._installed = list(report.clippers)
        w.relayer()
        # the gradients of this step were computed for the model before the fix: let the step
        # that follows skip its update (optimizers skip parameters whose grad is None) rather than
        # apply stale gradients to re-initialised or new weights
        for p in w.model.parameters():
            p.grad = None
        self._applied_at = w.collected + 1
        self.state = "verifying"
        self.model_changed(step, "applied", report)
        self._event(step, "applied", "; ".join(c.summary() for c in report.applied), report,
                    {"loss_before": self._before_loss, "severity_before": self._before_score})

    def _verify(self, step: int) -> None:
        w = self.watcher
        diag = w.diagnose(w.thresholds.updated(window=self.verify_steps))  # post-fix steps only
        after_loss = _median_loss(w, self.verify_steps)
        after_score = _severity_score(diag, self._kinds)
        loss_worse = math.isfinite(self._before_loss) and (
            not math.isfinite(after_loss) or after_loss > self._before_loss * (1 + self.loss_tolerance))
        after_silent = _silent_layers(diag)
        flow_worse = after_score > self._before_score or after_silent > self._before_silent
        evidence = {"loss_before": self._before_loss, "loss_after": after_loss,
                    "severity_before": self._before_score, "severity_after": after_score,
                    "silent_layers_before": self._before_silent, "silent_layers_after": after_silent}
        loss_worse, flow_worse, evidence = self.agree((loss_worse, flow_worse, evidence))
        if loss_worse or flow_worse:
            for hook in self._installed:
                hook.retire()  # we may be inside the optimizer's pre-hook loop: no hook removal here
            self._snapshot.restore()
            w.relayer()
            self.model_changed(step, "rolled_back")
            why = "the loss got worse" if loss_worse else "the gradient flow got worse"
            self._event(step, "rolled_back", f"{why}; model and optimizer restored to the snapshot", evidence=evidence)
        else:
            self._event(step, "kept", "loss and gradient flow did not get worse", evidence=evidence)
        self._snapshot = None
        self._installed = []
        self.state = "done"

    def _maybe_clip(self, step: int) -> None:
        """Start a verified clipping cycle when a finding ranks clipping first (once per run)."""
        from gradwatch.fixes import apply_fixes, snapshot

        w = self.watcher
        if w.optimizer is None:
            return
        diag = self.agree(w.diagnose())
        # under an Adam-like optimizer (invariant to gradient scale) only where clipping ranks first
        scale_invariant = w.history.context.get("optimizer_scale_invariant") is True
        targeted = [f for f in diag.findings if any(
            name in f.fixes and f.kind in get_fix_class(name).kinds and (f.fixes[0] == name or not scale_invariant)
            for name in self._cappers)]
        if not targeted:
            return
        kinds = {f.kind for f in targeted}
        snap = snapshot(w.model, w.optimizer)
        report = apply_fixes(w.model, diag, optimizer=w.optimizer, only=self._cappers, options=self.options)
        if not report.changed:
            return
        self._clipping = True  # decided once: kept or rolled back, it is not tried again
        self._kinds = kinds
        self._before_loss = _median_loss(w, self.probe_steps)
        self._before_score = _severity_score(diag, kinds)
        self._before_silent = _silent_layers(diag)
        self._snapshot = snap
        self._installed = list(report.clippers)
        self._applied_at = w.collected + 1
        self.state = "verifying"
        for clipper in report.clippers:
            w.add_step_callback(lambda watcher, s, c=clipper: watcher.set_scalar("clip_threshold", c.threshold)
                                if c.attached else None)
        self._event(step, "clipping", "; ".join(c.summary() for c in report.applied) + "; verifying", report,
                    {"loss_before": self._before_loss, "severity_before": self._before_score})

    # -- seams for training frameworks -----------------------------------------------------------
    def agree(self, value: Any) -> Any:
        """The value every process decides on. One process: ``value`` itself; an integration running
        several processes overrides this to return rank zero's (a broadcast), so that all ranks take
        the same decision at the same step (the diagnosis, the verification verdict)."""
        return value

    def model_changed(self, step: int, action: str, report: Any = None) -> None:
        """Called after the fixer changed the model and optimizer: ``action`` is ``"applied"`` (with the
        report) or ``"rolled_back"``. Integrations override it (schedulers, other ranks); default: nothing."""

    def _event(self, step: int, action: str, detail: str, report: Any = None, evidence: dict[str, Any] | None = None) -> None:
        event = AutoFixEvent(step=step, action=action, detail=detail, report=report, evidence=evidence or {})
        self.events.append(event)
        log.info("gradwatch auto-fix at step %d: %s - %s", step, action, detail)
        for sink in self.watcher.sinks:
            write_text = getattr(sink, "write_text", None)
            if callable(write_text):
                write_text("gradwatch/auto_fix", f"**{action}** at step {step}: {detail}", step)
