r"""
GradWatch Callback
==================

Per-layer gradient statistics and a gradient-flow diagnosis for a Lightning ``Trainer``: a thin
callback over the framework-free :class:`gradwatch.GradWatcher`.

"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from gradwatch.activations import ACT_METRICS
from gradwatch.collect import GRAD_METRICS, reduce_sharded_rows, scale_rows
from gradwatch.findings import FINDING_KINDS, FIX_NAMES, Diagnosis
from gradwatch.sinks import Sink, StepRecord
from gradwatch.thresholds import Thresholds
from gradwatch.watcher import GradWatcher

if TYPE_CHECKING:
    import pandas as pd
    from lightning.pytorch import LightningModule, Trainer

    from gradwatch.layers import LayerInfo

log = logging.getLogger(__name__)

#: Metrics sent to loggers' ``log_metrics`` by default (one scalar per layer and metric).
DEFAULT_METRICS: tuple[str, ...] = ("grad_norm", "grad_to_weight", "update_ratio", "nonfinite", "dead_frac", "saturated_frac")
_LOGGABLE_METRICS: tuple[str, ...] = GRAD_METRICS + ("dead_frac", "saturated_frac")
_STATE_VERSION = 1
_SEVERITY_LEVEL = {"warning": 1.0, "critical": 2.0}


class GradientHealthError(RuntimeError):
    """Raised by :class:`GradWatchCallback` when a finding named in ``fail_on`` appears."""

    def __init__(self, message: str, diagnosis: Diagnosis | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.diagnosis = diagnosis
        self.step = step


class GradWatchCallback(Callback):
    r"""Watch the gradients of the ``LightningModule`` during ``fit``: per-layer statistics, logs, diagnosis.

    Statistics are read in ``on_before_optimizer_step``: once per real optimizer step, after gradient
    accumulation, after DDP's all-reduce and AMP unscaling, before Lightning's gradient clipping, and
    recorded under ``trainer.global_step``.

    Where the numbers go:

    - a :class:`~lightning.pytorch.loggers.TensorBoardLogger` gets scalars, histograms, the dashboard
      layout and gradient-flow figures in its own run directory (``logger.experiment``);
    - every other logger (CSV, W&B, MLflow, ...) gets the per-layer scalars through
      ``logger.log_metrics`` (as :class:`~lightning.pytorch.callbacks.LearningRateMonitor` does);
      histograms and figures are skipped for them with one info message;
    - without a logger nothing is written, and ``callback.diagnosis`` / ``callback.to_dataframe()``
      still work after ``fit``.

    Only global rank zero writes logs. The diagnosis is printed on rank zero (Lightning's
    ``rank_zero_info``) at the end of every training epoch in which it changed, and at the end of ``fit``.

    What is collected with several optimizers or manual optimization: one collection per
    ``optimizer.step()`` (``on_before_optimizer_step`` fires for each), recorded under the
    ``global_step`` of that step (in manual optimization Lightning counts every optimizer's steps, so
    the steps of two optimizers get distinct numbers). A collection reads every ``.grad`` present at
    that moment; with Lightning's usual pattern (``toggle_optimizer`` or ``zero_grad()`` after each
    step) those are the gradients of the parameters the stepping optimizer is about to update, and the
    other layers are recorded as "no gradient" for that step. ``optimizers=`` restricts collection to
    the steps of some optimizers (indices into ``trainer.optimizers``).

    Distributed and precision notes:

    - DDP: gradients are already all-reduced in ``on_before_optimizer_step``, so gradient and weight
      statistics are identical on every rank and nothing extra is communicated. Activation
      statistics and the loss are those of each rank's local batch. With ``fail_on``, the stop
      decision is reduced across ranks (every rank stops at the same step).
    - FSDP2 / ``ModelParallelStrategy`` (``DTensor`` parameters, tensor parallelism included) and
      FSDP (``FSDPStrategy``): each rank holds shards, so per-layer rows are all-reduced across ranks
      before the host copy (sums of squares added then square root, max of max, element counts
      added; one small collective per collected step, on every rank). A layer that is replicated
      rather than sharded is counted once. A layer that mixes sharded and replicated parameters
      (e.g. ``RowwiseParallel``'s replicated bias) counts its replicated parameters once per
      replica (a warning says so).
    - ``16-mixed`` (``GradScaler``): Lightning unscales before ``on_before_optimizer_step``, so
      statistics are of the true gradients; for fused optimizers (which unscale inside ``step()``)
      the statistics are divided by ``scaler.get_scale()``. An inf/NaN step is loss-scale
      calibration, not a failure, until the scale falls below 1. ``bf16-mixed`` needs no scaler;
      statistics are computed in float32 either way.
    - ``torch.compile``: layer names carry no ``_orig_mod.``; activation statistics are turned off
      with one notice, because forward hooks would break the compiled graph into pieces.

    Args:
        every_n_steps: collect every n-th optimizer step. Default: ``1``.
        log_every_n_steps: send per-layer scalars to non-TensorBoard loggers (``log_metrics``) on every
            n-th optimizer step. Default: ``None`` (the ``Trainer``'s ``log_every_n_steps``). A
            TensorBoard logger gets every collected step (one event per step).
        metrics: which per-layer statistics go to loggers' ``log_metrics`` (any of
            ``GRAD_METRICS`` plus ``"dead_frac"``, ``"saturated_frac"``). Default: ``DEFAULT_METRICS``.
        activations: measure activations (dead units, saturation) on sampled steps. Default: ``True``.
        activation_every_n_steps: sample activations every n-th collected step. Default: ``50``.
        histogram_every_n_steps: TensorBoard histograms every n-th collected step, ``0`` never.
            Default: ``100``.
        figure_every_n_steps: TensorBoard gradient-flow figure every n-th collected step, ``0`` only at
            the end. Default: ``500``.
        diagnose_every_n_steps: recompute the diagnosis (for logs and ``fail_on``) every n-th
            collected step; it is also computed at each epoch end. Default: ``100``.
        thresholds: diagnosis thresholds. Default: ``None`` (``gradwatch.Thresholds()``).
        history_capacity: recent collected steps kept in full (and saved in checkpoints). Default: ``1000``.
        fail_on: finding kinds that stop training with :class:`GradientHealthError` (any of
            ``"nonfinite"``, ``"exploding"``, ``"vanishing"``, ``"dead_units"``, ``"saturation"``).
            ``"nonfinite"`` is checked on every collected step, the others when the diagnosis is
            computed. Default: ``()``.
        optimizers: ``None`` (every optimizer's steps) or indices into ``trainer.optimizers`` whose
            steps are collected. Default: ``None``.
        auto_fix: passed to the watcher's auto-fixer (with ``trainer.optimizers[0]``): ``False``
            (recommend only), ``True`` or fix names; see ``auto_fix_events``. Default: ``False``.
        verbose: print the diagnosis at epoch ends (when it changed) and at the end of ``fit``.
            Default: ``True``.
        on_error: ``"detach"`` (log one error, stop watching, training goes on) or ``"raise"``.
            Default: ``"detach"``.

    Raises:
        ValueError: an argument is out of range or names an unknown metric, finding kind or fix.
        TypeError: ``thresholds`` is not a :class:`gradwatch.Thresholds`.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> from gradwatch.integrations.lightning import GradWatchCallback
        >>> gradwatch_cb = GradWatchCallback(fail_on=("nonfinite",))
        >>> trainer = Trainer(callbacks=[gradwatch_cb], logger=TensorBoardLogger("runs"))
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> print(gradwatch_cb.diagnosis)  # doctest: +SKIP
        >>> df = gradwatch_cb.to_dataframe()  # doctest: +SKIP

    """

    def __init__(
        self,
        *,
        every_n_steps: int = 1,
        log_every_n_steps: int | None = None,
        metrics: Sequence[str] = DEFAULT_METRICS,
        activations: bool = True,
        activation_every_n_steps: int = 50,
        histogram_every_n_steps: int = 100,
        figure_every_n_steps: int = 500,
        diagnose_every_n_steps: int = 100,
        thresholds: Thresholds | None = None,
        history_capacity: int = 1000,
        fail_on: str | Iterable[str] = (),
        optimizers: int | Iterable[int] | None = None,
        auto_fix: bool | Iterable[str] = False,
        verbose: bool = True,
        on_error: str = "detach",
    ) -> None:
        super().__init__()
        self.every_n_steps = _positive_int("every_n_steps", every_n_steps)
        self.log_every_n_steps = None if log_every_n_steps is None else _positive_int("log_every_n_steps", log_every_n_steps)
        self.activation_every_n_steps = _positive_int("activation_every_n_steps", activation_every_n_steps)
        self.histogram_every_n_steps = _positive_int("histogram_every_n_steps", histogram_every_n_steps, allow_zero=True)
        self.figure_every_n_steps = _positive_int("figure_every_n_steps", figure_every_n_steps, allow_zero=True)
        self.diagnose_every_n_steps = _positive_int("diagnose_every_n_steps", diagnose_every_n_steps, allow_zero=True)
        self.history_capacity = _positive_int("history_capacity", history_capacity)
        if self.history_capacity < 2:
            raise ValueError(f"GradWatchCallback: history_capacity must be an integer >= 2, got {history_capacity!r}")
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise TypeError(f"GradWatchCallback: thresholds must be a gradwatch.Thresholds, got {type(thresholds).__name__}")
        self.thresholds = thresholds
        self.metrics = _names("metrics", metrics, _LOGGABLE_METRICS)
        self.fail_on = _names("fail_on", fail_on, FINDING_KINDS)
        self.optimizers = _indices(optimizers)
        self.auto_fix: bool | tuple[str, ...] = auto_fix if isinstance(auto_fix, bool) else _names("auto_fix", auto_fix, FIX_NAMES)
        if on_error not in ("detach", "raise"):
            raise ValueError(f"GradWatchCallback: on_error must be 'detach' or 'raise', got {on_error!r}")
        self.on_error = on_error
        self.activations = bool(activations)
        self.verbose = bool(verbose)

        self.watcher: GradWatcher | None = None
        self._diagnosis: Diagnosis | None = None
        self._printed_signature: tuple | None = None
        self._pending_state: dict[str, Any] | None = None
        self._optimizer_steps = 0          # on_before_optimizer_step calls seen (same count on every rank)
        self._last_step: int | None = None
        self._loss: torch.Tensor | None = None
        self._seen_nonfinite = 0
        self._unscale: _Unscaler | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, optimizers=self.optimizers)

    # -- results -------------------------------------------------------------------------------
    @property
    def auto_fix_events(self) -> list[Any]:
        """What the auto-fixer did (``gradwatch.autofix.AutoFixEvent`` records); empty without ``auto_fix``."""
        fixer = getattr(self.watcher, "autofixer", None)
        return list(getattr(fixer, "events", []))

    @property
    def diagnosis(self) -> Diagnosis | None:
        """The latest diagnosis (computed at epoch ends, on the diagnosis cadence and at the end of ``fit``)."""
        return self._diagnosis

    def to_dataframe(self, include_long_term: bool = False) -> pd.DataFrame:
        """Long format ``step, layer, metric, value, depth`` of the history (``step`` is ``trainer.global_step``).

        Raises:
            RuntimeError: called before ``fit`` started.
        """
        if self.watcher is None:
            raise RuntimeError("GradWatchCallback.to_dataframe(): nothing recorded yet; call it after `trainer.fit(...)`")
        return self.watcher.to_dataframe(include_long_term=include_long_term)

    def diagnose(self) -> Diagnosis:
        """Diagnose the recent history now (any time during or after ``fit``).

        Raises:
            RuntimeError: called before ``fit`` started.
        """
        if self.watcher is None:
            raise RuntimeError("GradWatchCallback.diagnose(): nothing recorded yet; call it after `trainer.fit(...)`")
        self._diagnosis = self.watcher.diagnose()
        return self._diagnosis

    # -- set-up --------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            rank_zero_warn("gradwatch: DeepSpeed keeps gradients in its own partitioned buffers (`param.grad` is None "
                           "under ZeRO stage 2/3), so GradWatchCallback may record no gradient statistics")
        # Hook point for auto-fix: a structural fix applied in an earlier run must be replayed here
        # (before the checkpoint's weights are loaded strictly), e.g. from ``trainer.ckpt_path``.
        self._replay_fixes(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Called after the strategy wrapped/sharded the model and built the optimizers, and after
        # a checkpoint's callback state was loaded: the parameters we see now are the trained ones.
        if self.watcher is not None:
            self.watcher.close()
        self._last_step = None
        self._loss = None
        self._diagnosis = None
        self._printed_signature = None
        self._optimizer_steps = 0
        self._seen_nonfinite = 0
        kwargs: dict[str, Any] = {}
        if self.thresholds is not None:
            kwargs["thresholds"] = self.thresholds
        activations = self.activations
        if activations and _is_compiled(pl_module):
            rank_zero_info("gradwatch: the model is compiled with torch.compile; activation statistics (dead units, "
                           "saturation) are turned off because forward hooks would break or be skipped by the compiled graph")
            activations = False
        if self.auto_fix:
            # The watcher's auto-fixer needs the optimizer (new parameters, snapshots); it is not hooked:
            # Lightning runs backward inside optimizer.step(closure), after any step pre-hook.
            kwargs["optimizer"] = trainer.optimizers[0] if trainer.optimizers else None
            kwargs["hook_optimizer"] = False
            if len(trainer.optimizers) > 1:
                rank_zero_warn("gradwatch: auto_fix tells only the first optimizer about parameters added by fixes")
            if trainer.world_size > 1:
                rank_zero_warn("gradwatch: auto_fix under a distributed strategy: structural fixes change the model "
                               "behind the DDP/FSDP wrapper; only re-initialisation and clipping are safe there")
        self.watcher = GradWatcher(
            pl_module,
            every_n_steps=self.every_n_steps,
            activations=activations,
            activation_every_n_steps=self.activation_every_n_steps,
            histogram_every_n_steps=self.histogram_every_n_steps,
            figure_every_n_steps=self.figure_every_n_steps,
            diagnose_every_n_steps=self.diagnose_every_n_steps,
            history_capacity=self.history_capacity,
            auto_fix=self.auto_fix,
            on_error=self.on_error,
            name=type(pl_module).__name__,
            **kwargs,
        )
        watcher = self.watcher
        if trainer.is_global_zero:  # only rank zero writes; on other ranks loggers are no-ops anyway
            watcher.sinks.extend(self._make_sinks(trainer, watcher))
        watcher.note_optimizers(*trainer.optimizers)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        watcher.history.context["amp_loss_scaling"] = scaler is not None
        self._unscale = _Unscaler(scaler) if scaler is not None else None
        reducer = _ShardReducer.for_trainer(trainer, pl_module, watcher)
        if reducer is not None or self._unscale is not None:
            watcher.row_reducer = _compose(reducer, self._unscale)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    def _make_sinks(self, trainer: Trainer, watcher: GradWatcher) -> list[Sink]:
        loggers = list(trainer.loggers)
        sinks: list[Sink] = []
        others: list[Logger] = []
        for logger in loggers:
            sink = _tensorboard_sink(logger, watcher) if isinstance(logger, TensorBoardLogger) else None
            if sink is None:
                others.append(logger)
            else:
                sinks.append(sink)
        if others:
            has_tensorboard = bool(sinks)
            every = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))
            sinks.append(_LoggerSink(others, self.metrics, every))
            if not has_tensorboard:
                rank_zero_info(
                    "gradwatch: histograms and gradient-flow figures need a TensorBoardLogger; with "
                    f"{', '.join(type(lg).__name__ for lg in others)} only per-layer scalars are logged "
                    "(through log_metrics)"
                )
        return sinks

    # -- the hot path --------------------------------------------------------------------------
    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        watcher = self.watcher
        if watcher is None:
            return
        # The forward pass of this (micro-)batch is over: LightningModules often call submodules
        # from training_step without calling their own forward, so end the one-shot hooks here.
        watcher.forward_done()
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            self._loss = loss.float() if self._loss is None else self._loss + loss.float()

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        watcher = self.watcher
        if watcher is None or trainer.sanity_checking:
            return
        if self.optimizers is not None and _optimizer_index(trainer, optimizer) not in self.optimizers:
            return
        step = int(trainer.global_step)
        if step == self._last_step:  # the same optimizer step seen twice: collect once
            return
        self._last_step = step
        self._optimizer_steps += 1
        if self._unscale is not None:
            self._unscale.prepare(optimizer)
        loss, self._loss = self._loss, None
        watcher.step(loss=loss, global_step=step)
        # With auto_fix, the watcher's auto-fixer ran inside watcher.step() above (its step callback):
        # fixes are applied here, before this optimizer step and before Lightning's clipping.
        self._check_fail_on(trainer, step)

    # -- reporting -----------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.watcher is None or not self.watcher.history.total_steps:
            return
        diag = self.diagnose()
        if self.verbose and diag.signature() != self._printed_signature:
            self._printed_signature = diag.signature()
            rank_zero_info(f"gradwatch diagnosis after epoch {trainer.current_epoch} (step {trainer.global_step}):\n{diag}")
        if self.fail_on:  # on every rank: the decision is reduced across ranks
            self._raise(trainer, diag, int(trainer.global_step), bool(self._failing(diag)))

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, report=True)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._finish(trainer, report=False)

    def _finish(self, trainer: Trainer, report: bool) -> None:
        watcher = self.watcher
        if watcher is None or watcher.closed:
            return
        if watcher.history.total_steps:
            diag = self.diagnose()
            if report and self.verbose:
                rank_zero_info(f"gradwatch diagnosis at the end of fit (step {trainer.global_step}):\n{diag}")
        watcher.close()

    # -- fail_on -------------------------------------------------------------------------------
    def _check_fail_on(self, trainer: Trainer, step: int) -> None:
        if not self.fail_on or self.watcher is None:
            return
        # Check points depend only on the optimizer-step count, the same on every rank, so the
        # collective in _raise runs on all ranks together.
        per_step = "nonfinite" in self.fail_on
        on_cadence = bool(self.diagnose_every_n_steps) and (
            self._optimizer_steps % (self.diagnose_every_n_steps * self.every_n_steps) == 0)
        if not (per_step or on_cadence):
            return
        watcher = self.watcher
        stop, reason, diag = False, "", None
        if per_step and watcher.history.nonfinite_steps > self._seen_nonfinite:
            self._seen_nonfinite = watcher.history.nonfinite_steps
            stop, reason = self._nonfinite_is_real()
        if on_cadence and not stop and watcher.history.total_steps:
            diag = self.diagnose()
            stop = bool(self._failing(diag))
        self._raise(trainer, diag, step, stop, reason)

    def _nonfinite_is_real(self) -> tuple[bool, str]:
        """A non-finite gradient is a real problem, unless AMP loss scaling is still calibrating."""
        if self._unscale is None:
            return True, ""
        # GradScaler halves its scale after every overflow: below 1 the gradients are non-finite
        # even without amplification, so this is not calibration any more.
        scale = float(self._unscale.scaler.get_scale())
        if scale < 1.0:
            return True, f"gradients stay non-finite although the AMP loss scale fell to {scale:g}"
        return False, ""

    def _failing(self, diag: Diagnosis) -> list[Any]:
        # Under AMP loss scaling an occasional inf step is calibration: "nonfinite" is decided per
        # step from the loss scale (above), not from the diagnosis.
        return [f for f in diag.findings if f.kind in self.fail_on and not (f.kind == "nonfinite" and self._unscale is not None)]

    def _raise(self, trainer: Trainer, diag: Diagnosis | None, step: int, stop: bool, reason: str = "") -> None:
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if not stop:
            return
        if diag is None and self.watcher is not None and self.watcher.history.total_steps:
            diag = self.diagnose()
        found = [f for f in (diag.findings if diag is not None else ()) if f.kind in self.fail_on]
        what = "; ".join(f"{f.kind} ({f.severity}) in {', '.join(f.layers[:4]) or 'the model'}: {f.message}" for f in found)
        what = "; ".join(x for x in (what, reason) if x) or "a finding named in fail_on appeared on another rank"
        message = (
            f"gradwatch stopped training at step {step}: {what} "
            f"(GradWatchCallback(fail_on={self.fail_on!r}); remove the kind from fail_on to keep training)"
        )
        raise GradientHealthError(message, diagnosis=diag, step=step)

    # -- auto-fix hook point --------------------------------------------------------------------
    def _replay_fixes(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Re-apply the structural fixes recorded in the checkpoint being resumed (``trainer.ckpt_path``).

        Called in ``setup``, before Lightning loads the checkpoint's weights strictly: a model changed
        by a fix mid-run must be changed the same way again or it cannot load its own checkpoint.
        Not implemented yet (owned by the auto-fix integration): the auto-fix records are not yet
        part of this callback's state.
        """

    # -- checkpointing -------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        watcher = self.watcher
        if watcher is None:
            return dict(self._pending_state or {})
        return {
            "version": _STATE_VERSION,
            "history": watcher.history.state_dict(),
            "calls": watcher.calls,
            "collected": watcher.collected,
            "structure": dict(watcher.structure),
            "last_step": self._last_step,
            "printed_signature": _signature_to_list(self._printed_signature),
            "seen_nonfinite": self._seen_nonfinite,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called before on_fit_start: keep it until the watcher exists.
        self._pending_state = dict(state_dict)
        if self.watcher is not None and not self.watcher.closed:
            self._restore(self._pending_state)
            self._pending_state = None

    def _restore(self, state: dict[str, Any]) -> None:
        watcher = self.watcher
        assert watcher is not None
        history = state.get("history")
        if history:
            watcher.history.load_state_dict(history)
        watcher.calls = int(state.get("calls", watcher.calls))
        watcher.collected = int(state.get("collected", watcher.collected))
        if state.get("structure") and not watcher.structure:
            watcher.structure = dict(state["structure"])
        last = state.get("last_step")
        self._last_step = None if last is None else int(last)
        self._printed_signature = _signature_from_list(state.get("printed_signature"))
        self._seen_nonfinite = int(state.get("seen_nonfinite", watcher.history.nonfinite_steps))


# -- helpers ---------------------------------------------------------------------------------------
def _positive_int(name: str, value: Any, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"GradWatchCallback: {name} must be an integer >= {low}, got {value!r}")
    return value


def _names(arg: str, value: str | Iterable[str], allowed: Sequence[str]) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"GradWatchCallback: {arg} has unknown value(s) {unknown}; allowed: {tuple(allowed)}")
    return tuple(dict.fromkeys(names))


def _indices(value: int | Iterable[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, int) else tuple(value)
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise ValueError(f"GradWatchCallback: optimizers must be None or non-negative optimizer indices, got {value!r}")
    return tuple(items)


def _optimizer_index(trainer: Trainer, optimizer: Any) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch optimizer
    for i, opt in enumerate(trainer.optimizers):
        if opt is inner or opt is optimizer:
            return i
    return -1


def _is_compiled(module: torch.nn.Module) -> bool:
    if getattr(module, "_compiler_ctx", None) is not None:  # trainer.fit(torch.compile(lightning_module))
        return True
    return any(hasattr(m, "_orig_mod") and isinstance(m, torch.nn.Module) and type(m).__name__ == "OptimizedModule"
               for m in module.modules())


def _signature_to_list(sig: tuple | None) -> list | None:
    return None if sig is None else [[k, s, list(layers)] for k, s, layers in sig]


def _signature_from_list(data: list | None) -> tuple | None:
    return None if data is None else tuple((k, s, tuple(layers)) for k, s, layers in data)


def _tensorboard_sink(logger: TensorBoardLogger, watcher: GradWatcher) -> Sink | None:
    """Everything (scalars, histograms, layout, figures, diagnosis text) into the logger's own run directory."""
    try:
        from gradwatch.tensorboard import TensorBoardSink
    except ImportError:  # pragma: no cover - only in a core without TensorBoard support
        return None
    return TensorBoardSink(logger.experiment, watcher=watcher)


class _LoggerSink:
    """Per-layer scalars through ``Logger.log_metrics`` (the ``LearningRateMonitor`` route).

    Keys are ``<metric>/<layer>`` with the layer named as in ``to_dataframe()`` (``grad_norm/total`` for
    the global norm); values that were not
    measured on a step (slow-cadence metrics, layers without gradient) are left out.
    """

    def __init__(self, loggers: Sequence[Logger], metrics: Sequence[str], every: int) -> None:
        self.loggers = list(loggers)
        self.every = every
        self._grad = [(GRAD_METRICS.index(m), m) for m in metrics if m in GRAD_METRICS]
        self._act = [(ACT_METRICS.index(m), m) for m in metrics if m in ACT_METRICS]

    def write_step(self, record: StepRecord) -> None:
        if record.step % self.every:
            return
        out: dict[str, float] = {}
        values = record.values
        for i, layer in enumerate(record.layers):
            for j, metric in self._grad:
                v = float(values[i, j])
                if math.isfinite(v):
                    out[f"{metric}/{layer}"] = v
        if record.act_values is not None:
            for i, name in enumerate(record.activations):
                for j, metric in self._act:
                    v = float(record.act_values[i, j])
                    if math.isfinite(v):
                        out[f"{metric}/{name}"] = v
        if math.isfinite(record.total_norm):
            out["grad_norm/total"] = float(record.total_norm)
        for key, value in record.extra.items():
            out[key] = float(value)
        if out:
            for logger in self.loggers:
                logger.log_metrics(out, step=record.step)

    def write_histograms(self, step: int, layers: list[LayerInfo]) -> None:
        pass

    def write_diagnosis(self, step: int, diagnosis: Diagnosis) -> None:
        out = {"gradwatch/healthy": float(diagnosis.healthy)}
        for kind in FINDING_KINDS:
            out[f"gradwatch/{kind}"] = max((_SEVERITY_LEVEL[f.severity] for f in diagnosis.by_kind(kind)), default=0.0)
        for logger in self.loggers:
            logger.log_metrics(out, step=step)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.save()

    def close(self) -> None:
        self.flush()


class _Unscaler:
    """Divides statistic rows by the loss scale when the optimizer unscales inside ``step()`` (fused)."""

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler
        self.factor: float | None = None

    def prepare(self, optimizer: Any) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)
        if getattr(inner, "_step_supports_amp_scaling", False):
            scale = float(self.scaler.get_scale())
            self.factor = 1.0 / scale if scale > 0 else None
        else:
            self.factor = None  # Lightning already called scaler.unscale_(optimizer)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.factor is None else scale_rows(rows, self.factor)


class _ShardReducer:
    """All-reduces per-layer statistic rows across ranks for sharded parameters (FSDP2/DTensor, FSDP).

    Sums are divided by each layer's replica count (how many ranks hold a copy of the same elements)
    so a layer that is replicated rather than sharded is not counted once per rank.
    """

    def __init__(self, watcher: GradWatcher, world_size: int, flat_sharded: bool) -> None:
        self.watcher = watcher
        self.world_size = world_size
        self.flat_sharded = flat_sharded  # FSDP1 (use_orig_params): plain tensors that are local shards
        self._layers: list[Any] | None = None
        self._replicas: torch.Tensor | None = None

    @classmethod
    def for_trainer(cls, trainer: Trainer, module: torch.nn.Module, watcher: GradWatcher) -> _ShardReducer | None:
        world_size = trainer.world_size
        if world_size <= 1:
            return None
        # FSDP (FSDPStrategy, use_orig_params=True): parameters are plain tensors holding this rank's
        # flat shard. FSDP2 / ModelParallelStrategy / tensor parallelism: DTensor parameters.
        fsdp1 = isinstance(trainer.strategy, FSDPStrategy)
        dtensor = any(_is_dtensor(p) for p in module.parameters())
        return cls(watcher, world_size, flat_sharded=fsdp1) if dtensor or fsdp1 else None

    def replicas(self) -> torch.Tensor:
        layers = self.watcher.layers
        if self._replicas is None or self._layers is not layers:
            counts = []
            for layer in layers:
                per_param = {self._replicas_of(p) for p in layer.params}
                if len(per_param) > 1:
                    log.warning("gradwatch: layer %s mixes sharded and replicated parameters; its reduced "
                                "statistics count the replicated ones more than once", layer.name)
                counts.append(float(min(per_param)) if per_param else 1.0)
            self._layers = layers
            self._replicas = torch.tensor(counts, dtype=torch.float32)
        return self._replicas

    def _replicas_of(self, p: torch.Tensor) -> int:
        if _is_dtensor(p):
            mesh = p.device_mesh
            shards = 1
            for dim, placement in enumerate(p.placements):
                if placement.is_shard():
                    shards *= mesh.size(dim)
            return max(1, self.world_size // shards)
        return 1 if self.flat_sharded else self.world_size

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return reduce_sharded_rows(rows, None, replicas=self.replicas())


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def _compose(*fns: Any) -> Any:
    chain = [f for f in fns if f is not None]

    def reduce(rows: torch.Tensor) -> torch.Tensor:
        for f in chain:
            rows = f(rows)
        return rows

    return reduce


__all__ = ["DEFAULT_METRICS", "GradWatchCallback", "GradientHealthError"]
