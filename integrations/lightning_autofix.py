"""Auto-fix inside a Trainer: which fixes a strategy allows mid-run, and the auto-fixer's Lightning variant.

- :func:`mid_run_refusals`: fixes a strategy cannot take mid-run, each with what to do instead;
- :class:`TrainerClipping`: the Trainer's own clipping (``gradient_clip_val``) driven by a core
  :class:`~gradwatch.fixes.clipping.GradientClipper` (Lightning clips right after
  ``on_before_optimizer_step``, reading ``gradient_clip_val`` at every step);
- :class:`LightningAutoFixer`: :class:`gradwatch.autofix.AutoFixer` whose decisions are rank zero's and
  whose clipping is the Trainer's.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import GradClipAlgorithmType

from gradwatch.autofix import AutoFixer, AutoFixEvent
from gradwatch.fixes import FixReport, apply_fixes
from gradwatch.fixes.clipping import GradientClipper, agc_
from gradwatch.fixes.record import to_plain
from gradwatch.fixes.registry import structural_fixes
from gradwatch.integrations.lightning_distributed import agree, strategy_kind

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

    from gradwatch.findings import Diagnosis
    from gradwatch.watcher import GradWatcher

_CLIPPER_ARGS = ("max_norm", "percentile", "window", "clip_factor", "eps")


def mid_run_refusals(trainer: Trainer, pl_module: LightningModule, allowed: Sequence[str]) -> dict[str, str]:
    """``{fix name: why it is refused mid-run here}`` for the fixes in ``allowed`` this Trainer cannot take."""
    kind = strategy_kind(trainer)
    name = type(trainer.strategy).__name__
    out: dict[str, str] = {}
    structural = [f for f in allowed if f in structural_fixes()]
    if structural and kind != "single":
        why = (f"{name} builds its wrapper over the parameters that exist when training starts: modules added "
               "mid-run would train unsynchronised (or not at all) on each process")
        for fix in structural:
            out[fix] = why
    if "he_init" in allowed and kind == "sharded":
        out["he_init"] = f"{name} holds sharded parameters: re-initialising them needs the full tensors"
    if "clip_gradients" in allowed:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if not pl_module.automatic_optimization:
            out["clip_gradients"] = ("manual optimization: Lightning does not clip for you; call "
                                     "self.clip_gradients(optimizer, gradient_clip_val=1.0) in training_step")
        elif kind == "sharded":
            out["clip_gradients"] = (f"{name} clips (or not) by its own configuration, fixed when training starts; "
                                     "set Trainer(gradient_clip_val=...) instead")
        elif scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            out["clip_gradients"] = ("a fused optimizer under 16-mixed unscales inside step(): Lightning cannot clip "
                                     "its gradients")
        elif trainer.gradient_clip_val:
            out["clip_gradients"] = (f"the Trainer already clips gradients (gradient_clip_val={trainer.gradient_clip_val!r}); "
                                     "left to it")
    return out


@dataclass
class TrainerClipping:
    """Gradient clipping chosen by the auto-fixer, carried out by the ``Trainer`` (``gradient_clip_val``).

    ``clipper`` (never attached to the optimizer) holds the mode, threshold and AutoClip history.
    ``"norm"``: a fixed threshold. ``"autoclip"``: the threshold follows the global norms seen
    (``clipper.observe`` at every step, before Lightning clips). ``"agc"``: Lightning has no unit-wise
    clipping, so :func:`gradwatch.fixes.clipping.agc_` runs in ``on_before_optimizer_step`` instead.

    Attributes:
        step: the step clipping was engaged at.
        active: False while the Trainer keeps a clipping value of its own (set by the user).
        seeded: the clipper's history already holds the current step's norm (it came from the diagnosis).
    """

    clipper: GradientClipper
    step: int | None = None
    active: bool = False
    seeded: bool = False

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainerClipping:
        """Read :meth:`state_dict` output (also that of gradwatch 0.1's own clipping record)."""
        clipper = GradientClipper(state.get("mode", "norm"), **{k: state[k] for k in _CLIPPER_ARGS if k in state})
        clipper.load_state_dict(state)
        return cls(clipper, step=state.get("step"), seeded=bool(clipper.history))

    def state_dict(self) -> dict[str, Any]:
        return {**self.clipper.state_dict(), "step": self.step, "gradient_clip_val": self.gradient_clip_val,
                "gradient_clip_algorithm": "norm"}

    @property
    def gradient_clip_val(self) -> float | None:
        """The value for ``trainer.gradient_clip_val`` (``None``: nothing to clip at, or AGC)."""
        if self.clipper.mode == "agc":
            return None
        value = self.clipper.threshold
        return value if math.isfinite(value) else None

    @property
    def threshold(self) -> float:
        """What to log as ``clip_threshold``: the norm threshold, or AGC's clip factor."""
        return self.clipper.threshold

    def install(self, trainer: Trainer) -> str:
        """Set the Trainer's clipping (unless the user set a different value); returns what was done."""
        value = self.gradient_clip_val
        if self.clipper.mode == "agc":
            self.active = True
            return f"unit-wise AGC (clip_factor={self.clipper.clip_factor:g}) applied in on_before_optimizer_step"
        current = trainer.gradient_clip_val
        if current and not (self.active and self.clipper.mode == "autoclip") and \
                not math.isclose(float(current), float(value or 0.0)):
            self.active = False
            return f"the Trainer's own gradient_clip_val={current!r} kept"
        self.active = True
        trainer.gradient_clip_val = value
        trainer.gradient_clip_algorithm = GradClipAlgorithmType.NORM
        return f"Trainer clipping: gradient_clip_val={value!r}, gradient_clip_algorithm='norm'"

    def before_lightning_clips(self, trainer: Trainer, optimizer: Any) -> None:
        """Per-step work, from ``on_before_optimizer_step`` (after gradwatch read the statistics)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        params = [p for group in inner.param_groups for p in group["params"]]
        if self.clipper.mode == "autoclip" and self.active:
            if self.seeded:
                self.seeded = False
            else:
                self.clipper.observe(params)
            trainer.gradient_clip_val = self.gradient_clip_val
            trainer.gradient_clip_algorithm = GradClipAlgorithmType.NORM
        elif self.clipper.mode == "agc":
            agc_(params, self.clipper.clip_factor, self.clipper.eps)


class LightningAutoFixer(AutoFixer):
    """:class:`gradwatch.autofix.AutoFixer` for a ``Trainer``.

    - decisions (the diagnosis acted on, the verification verdict, whether to clip) are rank zero's,
      broadcast to every rank at the same step;
    - clipping drives the Trainer's own clipping (:class:`TrainerClipping`) instead of an optimizer
      step pre-hook, which Lightning would run before the gradients exist (inside ``step(closure)``);
    - after a change, ``on_change(step, action, report)`` tells the callback (records, schedulers,
      other ranks).
    """

    def __init__(self, watcher: GradWatcher, allowed: tuple[str, ...], trainer: Trainer,
                 on_change: Callable[[int, str, FixReport | None], None], **kwargs: Any) -> None:
        super().__init__(watcher, allowed, **kwargs)
        self._trainer_ref = weakref.ref(trainer)
        self._on_change = on_change
        self.clipping: TrainerClipping | None = None

    def restore_clipping(self, clipping: TrainerClipping) -> None:
        """Clipping restored from a checkpoint: in force, and not decided again."""
        self.clipping = clipping
        self._clipping = True

    @property
    def trainer(self) -> Trainer:
        trainer = self._trainer_ref()
        assert trainer is not None
        return trainer

    def agree(self, value: Any) -> Any:
        return agree(self.trainer, value)

    def model_changed(self, step: int, action: str, report: Any = None) -> None:
        self._on_change(step, action, report)

    def refuse(self, step: int, refusals: dict[str, str]) -> None:
        """Record the fixes refused for this Trainer (one event)."""
        if refusals:
            self._event(step, "refused", "; ".join(f"{fix}: {why}" for fix, why in refusals.items()))

    def _maybe_clip(self, step: int) -> None:
        """Engage the Trainer's clipping once, on an exploding or non-finite diagnosis (rank zero's)."""
        w = self.watcher
        if w.optimizer is None:
            return
        diag: Diagnosis = self.agree(w.diagnose())
        if not ({"exploding", "nonfinite"} & diag.kinds()):
            return
        options = dict(self.options or {})
        options["clip_gradients"] = {**options.get("clip_gradients", {}), "attach": False}  # the Trainer clips
        report = apply_fixes(w.model, diag, optimizer=w.optimizer, only=["clip_gradients"], options=options)
        if not report.clippers:
            return
        clipper: GradientClipper = report.clippers[0]
        if clipper.mode == "autoclip" and not clipper.history:
            # AutoClip's history: the pre-clip global norms recorded so far
            clipper.load_state_dict({"history": [float(v) for v in w.history.view().total_norm if math.isfinite(v)]})
        self.clipping = TrainerClipping(clipper, step=step, seeded=bool(clipper.history))
        how = self.clipping.install(self.trainer)
        self._clipping = True
        w.set_scalar("clip_threshold", self.clipping.threshold)
        self._on_change(step, "clipping", report)
        self._event(step, "clipping", f"{report.applied[0].summary()}; {how}", report)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return to_plain({
            "state": self.state,
            "applied_at": self._applied_at,
            "before_loss": self._before_loss,
            "before_score": self._before_score,
            "before_silent": self._before_silent,
            "kinds": sorted(self._kinds),
            "clipping_decided": self._clipping,
            "clipping": self.clipping.state_dict() if self.clipping is not None else None,
            "events": [e.to_dict() for e in self.events],
        })

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        # the saved events first; those of this run so far (e.g. refusals) after them
        self.events = [_event_from_dict(e) for e in state.get("events", [])] + self.events
        self._applied_at = int(state.get("applied_at", 0))
        self._before_loss = float(state.get("before_loss", math.nan))
        self._before_score = float(state.get("before_score", 0.0))
        self._before_silent = int(state.get("before_silent", 0))
        self._kinds = set(state.get("kinds", []))
        self._clipping = bool(state.get("clipping_decided", self._clipping))
        clipping = state.get("clipping")
        self.clipping = TrainerClipping.from_dict(clipping) if clipping else None
        self.state = str(state.get("state", self.state))
        if self.state == "verifying":
            # The snapshot to roll back to lives in memory, not in checkpoints.
            self.state = "done"
            self._event(step, "kept", "resumed from a checkpoint saved while the fix was being verified: kept without "
                                      "verification (the snapshot to roll back to is not saved in checkpoints)")


def _event_from_dict(data: dict[str, Any]) -> AutoFixEvent:
    report = data.get("report")
    return AutoFixEvent(step=int(data.get("step", 0)), action=str(data.get("action", "")), detail=str(data.get("detail", "")),
                        report=FixReport.from_dict(report) if report else None, evidence=dict(data.get("evidence") or {}))


__all__ = ["LightningAutoFixer", "TrainerClipping", "mid_run_refusals"]
