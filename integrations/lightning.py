r"""
GradWatch Callback
==================

Per-layer gradient statistics and a gradient-flow diagnosis for a Lightning ``Trainer``: a thin
callback over the framework-free :class:`gradwatch.GradWatcher`.

"""

from __future__ import annotations

import atexit
import copy
import logging
import math
import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from gradwatch.activations import ACT_METRICS
from gradwatch.collect import GRAD_METRICS, reduce_sharded_rows, scale_rows, zero_rows
from gradwatch.findings import FINDING_KINDS, FIX_NAMES, Diagnosis
from gradwatch.fixes import apply_fixes
from gradwatch.integrations import lightning_fixes as _fixes
from gradwatch.preflight import PREFLIGHT_FIXES, PreflightResult, probe, split_batch
from gradwatch.report import for_logs
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

    Fixes (``preflight=`` before training, ``auto_fix=`` during it; the default only recommends):

    - ``preflight``: in ``setup()`` - before the strategy wraps the model and before
      ``configure_optimizers`` - :func:`gradwatch.preflight`'s probe runs ``preflight_steps``
      forward/backward passes on one training batch (no optimizer step; the model is restored bit
      for bit), diagnoses them and applies the allowed fixes. The batch is ``preflight_batch``, else
      the first batch of the training dataloader (the datamodule's ``train_dataloader()``, else the
      LightningModule's, else the dataloaders given to ``trainer.fit``), passed through the module's
      batch-transfer hooks. The loss is ``loss_fn(pl_module(inputs), target)`` on an ``(inputs,
      target)`` batch if ``loss_fn`` is given, else what ``training_step(batch, 0)`` returns (its
      ``self.log`` calls are ignored during the probe; manual optimization needs ``loss_fn``). The
      optimizer is then built over the fixed model: nothing to roll back, nothing to resume. With
      several processes, rank zero draws the batch, probes and decides; every rank applies the
      same fixes (checked) and rank zero's new weights are broadcast. The model must have its
      layers in ``setup()`` (not only from ``configure_model``).
    - ``auto_fix``: during training, after ``auto_fix_probe_steps`` collected steps the allowed fixes
      of the confirmed findings are applied once, verified over ``auto_fix_verify_steps`` and rolled
      back if things got worse (:mod:`gradwatch.autofix`). New parameters join
      ``trainer.optimizers[0]`` as new groups (``add_param_group``: the other parameters keep their
      state) and every LR scheduler of that optimizer gets per-group values for them (``base_lrs``,
      ``lr_lambdas``...). A rollback removes them again; the learning-rate schedule keeps its current
      values. Clipping (``clip_gradients``) drives the Trainer's own clipping:
      ``trainer.gradient_clip_val`` with ``gradient_clip_algorithm="norm"`` (Lightning clips right
      after ``on_before_optimizer_step``, so the statistics are those before clipping); its threshold
      is logged as ``clip_threshold``, it is kept in this callback's state and set again on resume
      unless the new Trainer clips by itself. A Trainer that already clips is left alone.
    - Several processes (DDP): every decision (the diagnosis acted on, the verification verdict,
      clipping) is rank zero's, broadcast to all ranks at the same step; re-initialised weights are
      broadcast from rank zero. Structural fixes mid-run (``insert_batchnorm``, ``residual``,
      ``swap_activation``, ``lstm_gru``) are refused there, with one warning: the DDP wrapper
      registers the parameters it synchronises when it is built, and rebuilding it from inside an
      optimizer step cannot be made safe. Apply them with ``preflight`` instead. Sharded strategies
      (FSDP, ``ModelParallelStrategy``, DeepSpeed) also refuse ``he_init`` and ``clip_gradients``
      mid-run. Recommendations are unaffected.
    - Checkpoints: the records of the fixes in effect (``FixReport.to_dict()``, see
      ``fix_records``), the auto-fixer's state, the clipping and the optimizer's group layout are
      saved in this callback's state. When Lightning loads a checkpoint (``fit``/``validate``/
      ``test``/``predict`` with ``ckpt_path``), its structural changes are replayed on the fresh
      LightningModule right before the weights are loaded strictly - from a ``load_state_dict``
      pre-hook registered in ``setup()``, because ``trainer.ckpt_path`` is only set by then - once
      per model instance; a preflight run in this ``setup()`` is undone first (the checkpoint
      decides). In ``on_fit_start`` the optimizer built by ``configure_optimizers`` is regrouped as
      saved before its state is loaded. Strategies that load weights after wrapping (FSDP,
      DeepSpeed) need ``trainer.ckpt_path = path`` set before ``trainer.fit(model)`` so the replay can
      happen in ``setup()``. For inference: :func:`replay_checkpoint`.

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
        histogram_max_elements: gradient elements binned on one step; a round of histograms is
            spread over consecutive steps (see :class:`gradwatch.GradWatcher`). ``None``: all at
            once. Default: ``2**20``.
        slow_stats_every_n: max and mean |g|, zero fractions, weight norms and update ratios every
            n-th collected step (``1``: every statistic on every step). Default: ``10``.
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
        auto_fix: fixes the auto-fixer may apply during training (to ``trainer.optimizers[0]``): ``False``
            (recommend only), ``True`` (all) or fix names; see "Fixes" above and ``auto_fix_events``.
            Default: ``False``.
        auto_fix_probe_steps: collected steps observed before the auto-fixer decides. Default: ``50``.
        auto_fix_verify_steps: collected steps trained after a fix before it is judged. Default: ``50``.
        preflight: fix before training: ``False``, ``True`` (``gradwatch.preflight.PREFLIGHT_FIXES``:
            the fixes that change the model) or fix names. Default: ``False``.
        preflight_batch: the preflight batch, as ``training_step`` receives it (before the
            batch-transfer hooks). Default: ``None`` (the first batch of the training dataloader).
        loss_fn: the preflight loss, ``loss_fn(pl_module(inputs), target)`` on an ``(inputs, target)``
            batch. Default: ``None`` (the loss ``training_step(batch, 0)`` returns).
        preflight_steps: forward/backward passes of the preflight probe. Default: ``6``.
        fix_options: per-fix options for preflight and auto-fix, e.g.
            ``{"swap_activation": {"to": "leaky_relu"}, "clip_gradients": {"max_norm": 0.5}}``.
            Default: ``None``.
        verbose: print the diagnosis at epoch ends (when it changed) and at the end of ``fit``.
            Default: ``True``.
        on_error: ``"detach"`` (log one error, stop watching, training goes on) or ``"raise"``.
            Default: ``"detach"``.

    Raises:
        ValueError: an argument is out of range or names an unknown metric, finding kind or fix.
        TypeError: ``thresholds`` is not a :class:`gradwatch.Thresholds`, ``loss_fn`` is not callable,
            ``fix_options`` is not a dict of dicts.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> from gradwatch.integrations.lightning import GradWatchCallback
        >>> gradwatch_cb = GradWatchCallback(fail_on=("nonfinite",))
        >>> trainer = Trainer(callbacks=[gradwatch_cb], logger=TensorBoardLogger("runs"))
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> print(gradwatch_cb.diagnosis)  # doctest: +SKIP
        >>> df = gradwatch_cb.to_dataframe()  # doctest: +SKIP
        >>> # fix a model before training, and let the auto-fixer clip if gradients explode:
        >>> fixing = GradWatchCallback(preflight=True, auto_fix=("clip_gradients",))
        >>> Trainer(callbacks=[fixing]).fit(model)  # doctest: +SKIP
        >>> print(fixing.preflight_result)  # doctest: +SKIP

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
        histogram_max_elements: int | None = 1 << 20,
        slow_stats_every_n: int = 10,
        figure_every_n_steps: int = 500,
        diagnose_every_n_steps: int = 100,
        thresholds: Thresholds | None = None,
        history_capacity: int = 1000,
        fail_on: str | Iterable[str] = (),
        optimizers: int | Iterable[int] | None = None,
        auto_fix: bool | Iterable[str] = False,
        auto_fix_probe_steps: int = 50,
        auto_fix_verify_steps: int = 50,
        preflight: bool | Iterable[str] = False,
        preflight_batch: Any = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        preflight_steps: int = 6,
        fix_options: dict[str, dict[str, Any]] | None = None,
        verbose: bool = True,
        on_error: str = "detach",
    ) -> None:
        super().__init__()
        self.every_n_steps = _positive_int("every_n_steps", every_n_steps)
        self.log_every_n_steps = None if log_every_n_steps is None else _positive_int("log_every_n_steps", log_every_n_steps)
        self.activation_every_n_steps = _positive_int("activation_every_n_steps", activation_every_n_steps)
        self.histogram_every_n_steps = _positive_int("histogram_every_n_steps", histogram_every_n_steps, allow_zero=True)
        self.histogram_max_elements = (None if histogram_max_elements is None
                                       else _positive_int("histogram_max_elements", histogram_max_elements))
        self.slow_stats_every_n = _positive_int("slow_stats_every_n", slow_stats_every_n)
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
        self.auto_fix_probe_steps = _positive_int("auto_fix_probe_steps", auto_fix_probe_steps)
        self.auto_fix_verify_steps = _positive_int("auto_fix_verify_steps", auto_fix_verify_steps)
        if isinstance(preflight, bool):
            self.preflight: tuple[str, ...] = PREFLIGHT_FIXES if preflight else ()
        else:
            self.preflight = _names("preflight", preflight, FIX_NAMES)
        self.preflight_batch = preflight_batch
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"GradWatchCallback: loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.preflight_steps = _positive_int("preflight_steps", preflight_steps)
        self.fix_options = _fix_options(fix_options)
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
        #: What preflight found and did in the last ``setup()`` (``None`` without ``preflight``).
        self.preflight_result: PreflightResult | None = None
        #: Structural ops replayed from the checkpoint being loaded (see "Fixes" above).
        self.replayed: list[dict[str, Any]] = []
        self._records: list[dict[str, Any]] = []
        self._clipping: _fixes.TrainerClipping | None = None
        self._tree: _fixes.TreeSnapshot | None = None  # the model before this setup's preflight
        self._preflight_record: dict[str, Any] | None = None
        self._load_hook: Any = None
        self._trainer_ref: weakref.ReferenceType[Trainer] | None = None
        self._module_ref: weakref.ReferenceType[LightningModule] | None = None
        self._pre_groups: list[dict[str, Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Strategies that start processes by pickling the Trainer (ddp_spawn) pickle its callbacks too.
        state = dict(self.__dict__)
        state.update(_trainer_ref=None, _module_ref=None, _load_hook=None, _tree=None)
        return state

    def _trainer(self) -> Trainer | None:
        return self._trainer_ref() if self._trainer_ref is not None else None

    def _module(self) -> LightningModule | None:
        return self._module_ref() if self._module_ref is not None else None

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
    def fix_records(self) -> list[dict[str, Any]]:
        """The fixes in effect on the model, oldest first, as saved in checkpoints: plain dicts
        ``{"id", "source": "preflight" | "auto_fix", "step", "report": FixReport.to_dict()}``.

        ``gradwatch.fixes.replay(fresh_model, record["report"])`` rebuilds a record's structural changes.
        """
        return copy.deepcopy(self._records)

    @property
    def _fixer(self) -> _fixes.LightningAutoFixer | None:
        fixer = getattr(self.watcher, "autofixer", None)
        return fixer if isinstance(fixer, _fixes.LightningAutoFixer) else None

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
        self._trainer_ref = weakref.ref(trainer)
        self._module_ref = weakref.ref(pl_module)
        if trainer.world_size > 1:
            _destroy_gloo_group_at_exit()
        if stage == "fit" and isinstance(trainer.strategy, DeepSpeedStrategy):
            rank_zero_warn("gradwatch: DeepSpeed keeps gradients in its own partitioned buffers (`param.grad` is None "
                           "under ZeRO stage 2/3), so GradWatchCallback may record no gradient statistics")
        # Every stage that may load a checkpoint (fit, validate, test, predict) needs the structural
        # changes of a fixed model replayed before its weights are loaded strictly.
        resuming = self._replay_fixes(trainer, pl_module)
        if stage == "fit" and self.preflight:
            if resuming:
                rank_zero_info("gradwatch: preflight skipped: resuming from a checkpoint, whose own record decides "
                               "the model's structure")
            else:
                self._preflight(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_load_hook()
        self._tree = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Called after the strategy wrapped/sharded the model and built the optimizers, and after
        # a checkpoint's callback state was loaded: the parameters we see now are the trained ones.
        self._remove_load_hook()
        self._tree = None  # weights are loaded: preflight's changes are final
        self._trainer_ref = weakref.ref(trainer)
        self._module_ref = weakref.ref(pl_module)
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
            # The auto-fixer needs the optimizer (new parameters, snapshots); it is not hooked:
            # Lightning runs backward inside optimizer.step(closure), after any step pre-hook.
            kwargs["optimizer"] = trainer.optimizers[0] if trainer.optimizers else None
            kwargs["hook_optimizer"] = False
            if len(trainer.optimizers) > 1:
                rank_zero_warn("gradwatch: auto_fix tells only the first optimizer about parameters added by fixes")
            elif not trainer.optimizers:
                rank_zero_warn("gradwatch: auto_fix needs an optimizer and the Trainer has none: recommendations only")
        self.watcher = GradWatcher(
            pl_module,
            every_n_steps=self.every_n_steps,
            activations=activations,
            activation_every_n_steps=self.activation_every_n_steps,
            histogram_every_n_steps=self.histogram_every_n_steps,
            histogram_max_elements=self.histogram_max_elements,
            slow_stats_every_n=self.slow_stats_every_n,
            figure_every_n_steps=self.figure_every_n_steps,
            diagnose_every_n_steps=self.diagnose_every_n_steps,
            history_capacity=self.history_capacity,
            auto_fix=False,  # the Lightning auto-fixer is attached below
            on_error=self.on_error,
            name=type(pl_module).__name__,
            **kwargs,
        )
        watcher = self.watcher
        refusals = self._attach_fixer(trainer, pl_module, watcher)
        if trainer.is_global_zero:  # only rank zero writes; on other ranks loggers are no-ops anyway
            watcher.sinks.extend(self._make_sinks(trainer, watcher))
        watcher.note_optimizers(*trainer.optimizers)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        watcher.history.context["amp_loss_scaling"] = scaler is not None
        watcher.scaler = scaler  # its loss scale is recorded on slow-stat steps (underflow finding)
        self._unscale = _Unscaler(scaler) if scaler is not None else None
        reducer = _ShardReducer.for_trainer(trainer, pl_module, watcher, then=self._unscale)
        watcher.row_reducer = reducer if reducer is not None else self._unscale
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        fixer = self._fixer
        if fixer is not None and refusals:
            fixer.refuse(self._next_step(trainer), refusals)
        if self._clipping is not None:  # restored from a checkpoint (or kept from an earlier fit)
            self._install_clipping(trainer)

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
        fixer = self._fixer
        if fixer is not None and fixer.state != "done" and watcher.optimizer is not None:
            # what the schedulers set, in case a rollback restores older param groups
            self._pre_groups = [_fixes.hyper(g) for g in watcher.optimizer.param_groups]
        watcher.step(loss=loss, global_step=step)
        # With auto_fix, the auto-fixer ran inside watcher.step() above (its step callback): fixes
        # are applied here, before this optimizer step and before Lightning's clipping.
        if self._clipping is not None:
            self._clipping.before_lightning_clips(trainer, optimizer)
        self._check_fail_on(trainer, step)

    # -- reporting -----------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.watcher is None:
            return
        diag = None
        if self.watcher.history.total_steps:
            diag = self.diagnose()
            if self.verbose and diag.signature() != self._printed_signature:
                self._printed_signature = diag.signature()
                rank_zero_info(f"gradwatch diagnosis after epoch {trainer.current_epoch} (step {trainer.global_step}):\n"
                               f"{for_logs(diag)}")
        if self.fail_on:
            # on every rank, whether or not it recorded anything (its watcher may have detached): the
            # decision is a collective, and a rank that skipped it would leave the others waiting in it
            self._raise(trainer, diag, int(trainer.global_step), bool(diag is not None and self._failing(diag)))

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
                rank_zero_info(f"gradwatch diagnosis at the end of fit (step {trainer.global_step}):\n{for_logs(diag)}")
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

    # -- replaying fixes from a checkpoint ----------------------------------------------------------
    def _replay_fixes(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Make sure the structural fixes recorded in a checkpoint are replayed before its weights load.

        Called in ``setup``, before Lightning loads the checkpoint's weights strictly: a model changed
        by a fix must be changed the same way again or it cannot load its own checkpoint. In
        ``Trainer.fit(ckpt_path=...)`` the path is not known yet in ``setup`` (``trainer.ckpt_path`` is
        set when Lightning reads the checkpoint, right before loading the weights), so a
        ``load_state_dict`` pre-hook on the LightningModule does the replay then. When the path is
        already known (``trainer.ckpt_path = path`` set before ``fit``), the replay happens here.

        Returns:
            True when a checkpoint is known to be resumed (the replay was done here).
        """
        self._remove_load_hook()
        self.replayed = []
        path = trainer.ckpt_path
        if path:
            self._resume_structure(trainer, pl_module, path)
            return True
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._load_hook = pl_module.register_load_state_dict_pre_hook(self._before_weights_load)
        return False

    def _before_weights_load(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str,
                             *args: Any) -> None:
        trainer = self._trainer()
        if trainer is None or prefix or not trainer.ckpt_path:
            return  # not Lightning loading a checkpoint (e.g. the user loading pretrained weights)
        self._remove_load_hook()
        self._resume_structure(trainer, module, trainer.ckpt_path, state_dict)

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def _resume_structure(self, trainer: Trainer, module: torch.nn.Module, path: str | os.PathLike[str],
                          state_dict: dict[str, Any] | None = None) -> None:
        if self._tree is not None:
            # This setup's preflight changed a model whose weights now come from a checkpoint: the
            # checkpoint's own record decides the structure.
            self._tree.restore()
            self._tree = None
            if self._preflight_record is not None:
                _fixes.mark_applied(module, self._preflight_record, applied=False)
                self._records = [r for r in self._records if r is not self._preflight_record]
                self._preflight_record = None
            rank_zero_info("gradwatch: loading a checkpoint: this run's preflight changes were undone (the "
                           "checkpoint's record decides the model's structure)")
        try:
            states = _fixes.gradwatch_states(_fixes.read_checkpoint(path, trainer, trusted=True), self.state_key)
        except Exception as exc:  # Lightning has read it; if it needs a replay its strict load will say so
            rank_zero_warn(f"gradwatch: could not read the fix record of {path} ({type(exc).__name__}: {exc}); "
                           "a model changed by gradwatch's fixes will not load its weights")
            return
        records = [r for state in states for r in state.get("fix_records", []) or []]
        if not records:
            return
        self.replayed = _fixes.replay_records(module, records)
        self._records = copy.deepcopy(records)
        if self.replayed:
            rank_zero_info(f"gradwatch: replayed {len(self.replayed)} structural change(s) recorded in {path} "
                           f"before loading its weights: {', '.join(op['op'] + ' ' + op['path'] for op in self.replayed)}")
        if state_dict is not None:
            have, want = set(module.state_dict()), set(state_dict)
            if have != want:
                rank_zero_warn(f"gradwatch: after replaying the checkpoint's fixes the model still differs from it: "
                               f"missing {sorted(want - have)[:8]}, unexpected {sorted(have - want)[:8]}")

    # -- preflight ---------------------------------------------------------------------------------
    def _preflight(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError("GradWatchCallback(preflight=...) with manual optimization needs loss_fn=...: "
                             "training_step steps the optimizers itself, so it cannot be probed")
        if next(pl_module.parameters(), None) is None:
            rank_zero_warn("gradwatch: preflight skipped: the LightningModule has no parameters in setup() (built in "
                           "configure_model?); call gradwatch.preflight(...) at the end of configure_model instead")
            return
        from lightning.fabric.utilities.apply_func import move_data_to_device

        param = next(pl_module.parameters())

        def decide() -> tuple[Diagnosis, Any]:
            batch = self.preflight_batch
            if batch is None:
                try:
                    batch = _fixes.first_train_batch(trainer, pl_module)
                except Exception as exc:
                    raise RuntimeError(f"GradWatchCallback(preflight=...) could not draw a training batch in setup() "
                                       f"({type(exc).__name__}: {exc}); pass preflight_batch=...") from exc
            batch = _fixes.to_module_device(pl_module, batch)
            with self._loss_context(pl_module):
                diagnosis = probe(pl_module, self._probe_batch(batch), self._probe_loss(), steps=self.preflight_steps,
                                  thresholds=self.thresholds)
            return diagnosis, (move_data_to_device(batch, "cpu") if trainer.world_size > 1 else batch)

        diagnosis, batch = _fixes.from_rank_zero(trainer, decide)  # rank zero decides for every rank
        batch = move_data_to_device(batch, param.device)
        tree = _fixes.TreeSnapshot(pl_module)
        with self._loss_context(pl_module):
            report = apply_fixes(pl_module, diagnosis, only=self.preflight, example_input=self._probe_batch(batch)[0],
                                 options=self.fix_options)
        if trainer.world_size > 1:
            mine = _fixes.structure_fingerprint(pl_module)
            same = mine == trainer.strategy.broadcast(mine, src=0)
            if not trainer.strategy.reduce_boolean_decision(same, all=True):
                raise RuntimeError("gradwatch preflight: the ranks changed the model differently from the same "
                                   "diagnosis; training would not be synchronised")
            if report.changed:
                _fixes.broadcast_modules(trainer, pl_module, _fixes.touched_prefixes(report))
        self.preflight_result = PreflightResult(diagnosis=diagnosis, report=report)
        if report.changed:
            record = _fixes.new_record("preflight", None, report)
            self._records.append(record)
            _fixes.mark_applied(pl_module, record)
            self._preflight_record, self._tree = record, tree
        if self.verbose:
            rank_zero_info(f"gradwatch preflight (before training, {self.preflight_steps} probe passes on one batch):\n"
                           f"{self.preflight_result}")

    def _probe_batch(self, batch: Any) -> tuple[Any, Any]:
        """``(inputs, target)`` for ``gradwatch.preflight.probe``: the batch's own pair with ``loss_fn``,
        else the whole batch as the only input of the module (whose forward runs ``training_step``)."""
        return split_batch(batch) if self.loss_fn is not None else ((batch,), None)

    def _probe_loss(self) -> Callable[[Any, Any], torch.Tensor]:
        return self.loss_fn if self.loss_fn is not None else _training_step_loss

    def _loss_context(self, pl_module: LightningModule) -> Any:
        import contextlib

        return contextlib.nullcontext() if self.loss_fn is not None else _fixes.training_step_as_forward(pl_module)

    # -- auto-fix inside the Trainer ------------------------------------------------------------------
    def _attach_fixer(self, trainer: Trainer, pl_module: LightningModule, watcher: GradWatcher) -> dict[str, str]:
        """Attach the Lightning auto-fixer to the watcher; returns the fixes refused for this Trainer."""
        if not self.auto_fix or watcher.optimizer is None:
            return {}
        requested = FIX_NAMES if self.auto_fix is True else tuple(self.auto_fix)
        refusals = _fixes.mid_run_refusals(trainer, pl_module, requested)
        allowed = tuple(f for f in requested if f not in refusals)
        watcher.auto_fix = allowed
        watcher.autofixer = _fixes.LightningAutoFixer(
            watcher, allowed, trainer, self._on_fix_change, probe_steps=self.auto_fix_probe_steps,
            verify_steps=self.auto_fix_verify_steps, options=self.fix_options)
        if refusals:
            rank_zero_warn(
                f"gradwatch: auto_fix under {type(trainer.strategy).__name__} (world size {trainer.world_size}) refuses "
                + "; ".join(f"{fix} ({why})" for fix, why in refusals.items())
                + ". Preflight (GradWatchCallback(preflight=...), applied in setup() before the model is wrapped), "
                "recommendations and the other fixes still work."
            )
        return refusals

    def _on_fix_change(self, step: int, action: str, report: Any = None) -> None:
        """The auto-fixer changed the model/optimizer (``applied``, ``rolled_back``) or engaged clipping."""
        trainer, module, watcher, fixer = self._trainer(), self._module(), self.watcher, self._fixer
        assert trainer is not None and module is not None and watcher is not None
        optimizer = watcher.optimizer
        if action == "clipping":
            self._clipping = fixer.clipping if fixer is not None else None
            return
        if action == "applied":
            record = _fixes.new_record("auto_fix", step, report)
            self._records.append(record)
            _fixes.mark_applied(module, record)
            if trainer.world_size > 1:  # the same decision everywhere; re-initialised weights from rank zero
                _fixes.broadcast_modules(trainer, module, _fixes.touched_prefixes(report))
        elif action == "rolled_back":
            last = next((r for r in reversed(self._records) if r.get("source") == "auto_fix"), None)
            if last is not None:
                self._records.remove(last)
                _fixes.mark_applied(module, last, applied=False)
            if optimizer is not None and self._pre_groups is not None:
                for group, values in zip(optimizer.param_groups, self._pre_groups, strict=False):
                    group.update(values)  # the schedule's current values, not the snapshot's older ones
        if optimizer is not None and self._pre_groups is not None:
            changed = _fixes.fit_schedulers(trainer, optimizer, len(self._pre_groups))
            if changed:
                log.info("gradwatch: LR schedulers resized to %d param groups (%s)", len(optimizer.param_groups),
                         ", ".join(changed))

    def _next_step(self, trainer: Trainer | None) -> int:
        """The global step training continues at (``trainer.global_step`` is restored only after ``on_fit_start``)."""
        if self._last_step is not None:
            return self._last_step + 1
        return int(trainer.global_step) if trainer is not None else 0

    def _install_clipping(self, trainer: Trainer) -> None:
        clipping = self._clipping
        if clipping is None:
            return
        how = clipping.install(trainer)
        if self.watcher is not None:
            self.watcher.set_scalar("clip_threshold", clipping.threshold)
        rank_zero_info(f"gradwatch: gradient clipping engaged by auto_fix at step {clipping.step} restored: {how}")

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
            "fix_records": copy.deepcopy(self._records),
            "optimizer_layout": self._optimizer_layout(),
            "autofix": self._fixer.state_dict() if self._fixer is not None else (self._pending_state or {}).get("autofix"),
            "clipping": self._clipping.state_dict() if self._clipping is not None else None,
        }

    def _optimizer_layout(self) -> list[list[str]] | None:
        """Parameter names per group of the optimizer the fixes told about new parameters (only when they did)."""
        module = self._module()
        optimizer = self.watcher.optimizer if self.watcher is not None else None
        if module is None or optimizer is None or not any(_fixes.changes_parameters(r) for r in self._records):
            return None
        return _fixes.param_layout(optimizer, module)

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
        self._restore_fixes(state)

    def _restore_fixes(self, state: dict[str, Any]) -> None:
        """Records, auto-fixer, clipping; the optimizer regrouped as saved (before Lightning loads its state)."""
        trainer, module, watcher = self._trainer(), self._module(), self.watcher
        records = state.get("fix_records")
        if records is not None:
            self._records = copy.deepcopy(list(records))
        fixer = self._fixer
        if fixer is not None and state.get("autofix"):
            fixer.load_state_dict(state["autofix"], step=self._next_step(trainer))
        clipping = state.get("clipping")
        if clipping:
            self._clipping = _fixes.TrainerClipping.from_dict(clipping)
            if fixer is not None:
                fixer.clipping = self._clipping
                fixer._clipping = True
        layout = state.get("optimizer_layout")
        optimizer = watcher.optimizer if watcher is not None else None
        if optimizer is None and trainer is not None and trainer.optimizers:
            optimizer = trainer.optimizers[0]
        if layout and optimizer is not None and module is not None and trainer is not None:
            regrouped = _fixes.regroup(optimizer, module, layout)
            if regrouped is not None:
                n_before, sources = regrouped
                _fixes.fit_schedulers(trainer, optimizer, n_before, sources)
                log.info("gradwatch: optimizer regrouped as saved with the checkpoint (%d -> %d param groups)", n_before,
                         len(optimizer.param_groups))


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


def _fix_options(value: Any) -> dict[str, dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise TypeError(f"GradWatchCallback: fix_options must be a dict of per-fix option dicts, got {value!r}")
    _names("fix_options", list(value), FIX_NAMES)
    return {k: dict(v) for k, v in value.items()}


def _training_step_loss(output: torch.Tensor, target: Any) -> torch.Tensor:
    return output  # the module's forward runs training_step and returns its loss


def replay_checkpoint(model: torch.nn.Module, checkpoint: str | os.PathLike[str] | dict[str, Any]) -> list[dict[str, Any]]:
    """Rebuild on a fresh model the structure that ``GradWatchCallback`` fixes gave it in a Lightning checkpoint.

    For inference or any use outside ``Trainer.fit``: a checkpoint of a model changed by
    ``preflight`` or ``auto_fix`` has the fixed structure, which a fresh instance lacks.

    Args:
        model: a fresh instance of the LightningModule (or of the module the records were made on).
        checkpoint: the checkpoint's path or its loaded contents.

    Returns:
        The structural ops applied, in order.

    Raises:
        RuntimeError: a record does not fit the model.
        pickle.UnpicklingError: the file holds objects ``torch.load(weights_only=True)`` refuses; pass
            the contents loaded the way you trust instead of the path.

    Example::

        >>> model = LitModel()  # doctest: +SKIP
        >>> replay_checkpoint(model, "last.ckpt")  # doctest: +SKIP
        >>> model.load_state_dict(torch.load("last.ckpt")["state_dict"])  # strict  # doctest: +SKIP
        >>> # the same by hand: a record is a plain dict whose "report" gradwatch.fixes.replay takes
        >>> for record in torch.load("last.ckpt")["callbacks"][key]["fix_records"]:  # doctest: +SKIP
        ...     gradwatch.fixes.replay(model, record["report"])
    """
    data = checkpoint if isinstance(checkpoint, dict) else _fixes.read_checkpoint(checkpoint)
    records = [r for state in _fixes.gradwatch_states(data) for r in state.get("fix_records", []) or []]
    return _fixes.replay_records(model, records)


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
    so a layer that is replicated rather than sharded is not counted once per rank. ``then`` (e.g. the
    AMP unscaling) is applied to the reduced rows. A collective: after the watcher of this rank fails,
    it takes part once more through :meth:`abstain`, and the watchers of the other ranks stop at that step.
    """

    def __init__(self, watcher: GradWatcher, world_size: int, flat_sharded: bool,
                 then: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.watcher = watcher
        self.world_size = world_size
        self.flat_sharded = flat_sharded  # FSDP1 (use_orig_params): plain tensors that are local shards
        self.then = then
        self._layers: list[Any] | None = None
        self._replicas: torch.Tensor | None = None
        self._last: torch.Tensor | None = None  # the last rows reduced: shape, dtype and device to abstain with

    @classmethod
    def for_trainer(cls, trainer: Trainer, module: torch.nn.Module, watcher: GradWatcher,
                    then: Callable[[torch.Tensor], torch.Tensor] | None = None) -> _ShardReducer | None:
        world_size = trainer.world_size
        if world_size <= 1:
            return None
        # FSDP (FSDPStrategy, use_orig_params=True): parameters are plain tensors holding this rank's
        # flat shard. FSDP2 / ModelParallelStrategy / tensor parallelism: DTensor parameters.
        fsdp1 = isinstance(trainer.strategy, FSDPStrategy)
        dtensor = any(_is_dtensor(p) for p in module.parameters())
        return cls(watcher, world_size, flat_sharded=fsdp1, then=then) if dtensor or fsdp1 else None

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
        self._last = rows
        rows = reduce_sharded_rows(rows, None, replicas=self.replicas())
        return self.then(rows) if self.then is not None else rows

    def abstain(self) -> None:
        """Take part in this step's reduction with zero rows, telling every rank that this one's watcher failed."""
        last = self._last
        if last is not None:
            rows = torch.zeros_like(last)
        else:  # failed before its first reduction: the rows the collector would have made
            params = [p for layer in self.watcher.layers for p in layer.params]
            rows = zero_rows(len(self.watcher.layers), device=params[0].device if params else None)
        reduce_sharded_rows(rows, None, replicas=self.replicas(), failed=True)


_EXIT_HANDLER: list[Callable[[], None]] = []


def _destroy_gloo_group_at_exit() -> None:
    """Destroy a gloo default process group at interpreter exit, before finalization (once per process).

    Lightning registers this for NCCL only. A gloo group left alive at exit keeps its worker threads,
    which may still hold the tensors of the last collective (e.g. the ``fail_on`` decision, right
    before training stops): releasing one during interpreter finalization needs the GIL, the thread
    is torn down inside a ``noexcept`` destructor, and the process aborts with "terminate called
    without an active exception" (SIGABRT) instead of exiting cleanly. Destroying the group while the
    interpreter is alive joins those threads first.
    """
    import torch.distributed as dist

    if _EXIT_HANDLER or not (dist.is_available() and dist.is_initialized()):
        return
    if "gloo" not in str(dist.get_backend()):
        return

    def destroy() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    _EXIT_HANDLER.append(destroy)
    atexit.register(destroy)


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


__all__ = ["DEFAULT_METRICS", "GradWatchCallback", "GradientHealthError", "replay_checkpoint"]
