r"""
GradWatch Callback
==================

Per-layer gradient statistics and a gradient-flow diagnosis for a Lightning ``Trainer``: a thin
callback over the framework-free :class:`gradwatch.GradWatcher`.

"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from gradwatch.findings import FINDING_KINDS, Diagnosis
from gradwatch.fixes.registry import list_fixes, preflight_fixes
from gradwatch.integrations.lightning_amp import AmpUnscaler
from gradwatch.integrations.lightning_checkpoint import replay_checkpoint
from gradwatch.integrations.lightning_distributed import ShardReducer, destroy_gloo_group_at_exit
from gradwatch.integrations.lightning_fail_on import FailOn, GradientHealthError
from gradwatch.integrations.lightning_fixes import TrainerFixes
from gradwatch.integrations.lightning_sinks import DEFAULT_METRICS, LOGGABLE_METRICS, make_sinks
from gradwatch.options import WatchOptions, check_count, check_names
from gradwatch.options import fix_options as check_fix_options
from gradwatch.preflight import PreflightResult
from gradwatch.report import for_logs
from gradwatch.thresholds import Thresholds
from gradwatch.watcher import GradWatcher

if TYPE_CHECKING:
    import pandas as pd
    from lightning.pytorch import LightningModule, Trainer

log = logging.getLogger(__name__)

_STATE_VERSION = 1
#: ``gradwatch.watch`` options this callback sets itself (the Trainer owns the model, optimizer and loggers).
_SET_BY_CALLBACK = ("optimizer", "hook_optimizer", "log_dir", "sinks", "scaler", "name", "auto_fix_options", "hot_path",
                    "track_updates")


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

    Fixes (``preflight=`` before training, ``auto_fix=`` during it; the default only recommends) are the
    work of :class:`gradwatch.integrations.lightning_fixes.TrainerFixes` (its module says how they run
    inside a Trainer, with several processes and across checkpoints): ``preflight`` fixes the model in
    ``setup()``, before the optimizer is built; ``auto_fix`` applies fixes once during training, verifies
    them and rolls back what made things worse; clipping drives the Trainer's own ``gradient_clip_val``.
    A checkpoint of a fixed model saves the fix records (``fix_records``); loading it replays them on a
    fresh model before its weights load. For inference: :func:`replay_checkpoint`.

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
            the end. Default: ``2000``.
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
            (recommend only), ``True`` (the default policy's fixes, as ``gradwatch.watch``: opt-in ones
            such as ``skip_spikes`` only when named) or fix names; see "Fixes" above and ``auto_fix_events``.
            Default: ``False``.
        auto_fix_probe_steps: collected steps observed before the auto-fixer decides. Default: ``50``.
        auto_fix_verify_steps: collected steps trained after a fix before it is judged. Default: ``50``.
        preflight: fix before training: ``False``, ``True`` (``gradwatch.fixes.preflight_fixes()``:
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
        figure_every_n_steps: int = 2000,
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
        name = "GradWatchCallback"
        #: The watcher's options, validated here (``gradwatch.options.WatchOptions``).
        self.options = WatchOptions.build(
            name, exclude=_SET_BY_CALLBACK, every_n_steps=every_n_steps, activations=bool(activations),
            activation_every_n_steps=activation_every_n_steps, histogram_every_n_steps=histogram_every_n_steps,
            histogram_max_elements=histogram_max_elements, slow_stats_every_n=slow_stats_every_n,
            figure_every_n_steps=figure_every_n_steps, diagnose_every_n_steps=diagnose_every_n_steps,
            thresholds=thresholds, history_capacity=history_capacity, auto_fix=auto_fix,
            auto_fix_probe_steps=auto_fix_probe_steps, auto_fix_verify_steps=auto_fix_verify_steps, on_error=on_error,
        )
        self.log_every_n_steps = None if log_every_n_steps is None else check_count(f"{name}: log_every_n_steps",
                                                                                    log_every_n_steps)
        self.metrics = check_names(f"{name}: metrics", metrics, LOGGABLE_METRICS)
        self.fail_on = check_names(f"{name}: fail_on", fail_on, FINDING_KINDS, what="finding kind")
        self.optimizers = _indices(optimizers)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"{name}: loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}")
        self.verbose = bool(verbose)
        self._fixes = TrainerFixes(
            auto_fix=self.options.auto_fix,  # type: ignore[arg-type]
            preflight=tuple(preflight_fixes()) if preflight is True else check_names(f"{name}: preflight", preflight or (), list_fixes()),
            options=check_fix_options(f"{name}: fix_options", fix_options), probe_steps=self.options.auto_fix_probe_steps,
            verify_steps=self.options.auto_fix_verify_steps, preflight_batch=preflight_batch, loss_fn=loss_fn,
            preflight_steps=check_count(f"{name}: preflight_steps", preflight_steps), thresholds=self.options.thresholds,
            verbose=self.verbose)

        self.watcher: GradWatcher | None = None
        self._diagnosis: Diagnosis | None = None
        self._printed_signature: tuple | None = None
        self._pending_state: dict[str, Any] | None = None
        self._optimizer_steps = 0          # on_before_optimizer_step calls seen (same count on every rank)
        self._last_step: int | None = None
        self._loss: torch.Tensor | None = None
        self._fail_on = FailOn(self.fail_on, self.diagnose)
        self._unscale: AmpUnscaler | None = None
        self._trainer_ref: weakref.ReferenceType[Trainer] | None = None
        self._module_ref: weakref.ReferenceType[LightningModule] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Strategies that start processes by pickling the Trainer (ddp_spawn) pickle its callbacks too.
        state = dict(self.__dict__)
        state.update(_trainer_ref=None, _module_ref=None)
        return state

    def _trainer(self) -> Trainer | None:
        return self._trainer_ref() if self._trainer_ref is not None else None

    def _module(self) -> LightningModule | None:
        return self._module_ref() if self._module_ref is not None else None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.options.every_n_steps, optimizers=self.optimizers)

    # -- results -------------------------------------------------------------------------------
    @property
    def auto_fix_events(self) -> list[Any]:
        """What the auto-fixer did (``gradwatch.autofix.AutoFixEvent`` records); empty without ``auto_fix``."""
        fixer = self.watcher.autofixer if self.watcher is not None else None
        return list(fixer.events) if fixer is not None else []

    @property
    def fix_records(self) -> list[dict[str, Any]]:
        """The fixes in effect on the model, oldest first, as saved in checkpoints: plain dicts
        ``{"id", "source": "preflight" | "auto_fix", "step", "report": FixReport.to_dict()}``
        (:meth:`gradwatch.fixes.record.FixRecord.to_dict`).

        ``gradwatch.fixes.replay(fresh_model, record["report"])`` rebuilds a record's structural changes.
        """
        return [r.to_dict() for r in self._fixes.records]

    @property
    def preflight_result(self) -> PreflightResult | None:
        """What preflight found and did in the last ``setup()`` (``None`` without ``preflight``)."""
        return self._fixes.preflight_result

    @property
    def replayed(self) -> list[dict[str, Any]]:
        """Structural ops replayed from the checkpoint being loaded (see "Fixes" above)."""
        return self._fixes.replayed

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
            destroy_gloo_group_at_exit()
        if stage == "fit" and isinstance(trainer.strategy, DeepSpeedStrategy):
            rank_zero_warn("gradwatch: DeepSpeed keeps gradients in its own partitioned buffers (`param.grad` is None "
                           "under ZeRO stage 2/3), so GradWatchCallback may record no gradient statistics")
        # Every stage that may load a checkpoint (fit, validate, test, predict) needs the structural
        # changes of a fixed model replayed before its weights are loaded strictly.
        self._fixes.setup(trainer, pl_module, stage, self.state_key)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._fixes.weights_final()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Called after the strategy wrapped/sharded the model and built the optimizers, and after
        # a checkpoint's callback state was loaded: the parameters we see now are the trained ones.
        self._fixes.weights_final()
        self._trainer_ref = weakref.ref(trainer)
        self._module_ref = weakref.ref(pl_module)
        if self.watcher is not None:
            self.watcher.close()
        self._last_step = None
        self._loss = None
        self._diagnosis = None
        self._printed_signature = None
        self._optimizer_steps = 0
        self._fail_on.seen_nonfinite = 0
        options = self.options.replace(auto_fix=False)  # the Lightning auto-fixer is attached below
        if options.activations and _is_compiled(pl_module):
            rank_zero_info("gradwatch: the model is compiled with torch.compile; activation statistics (dead units, "
                           "saturation) are turned off because forward hooks would break or be skipped by the compiled graph")
            options = options.replace(activations=False)
        if self.options.auto_fix:
            # The auto-fixer needs the optimizer (new parameters, snapshots); it is not hooked:
            # Lightning runs backward inside optimizer.step(closure), after any step pre-hook.
            options = options.replace(optimizer=trainer.optimizers[0] if trainer.optimizers else None, hook_optimizer=False)
            if len(trainer.optimizers) > 1:
                rank_zero_warn("gradwatch: auto_fix tells only the first optimizer about parameters added by fixes")
            elif not trainer.optimizers:
                rank_zero_warn("gradwatch: auto_fix needs an optimizer and the Trainer has none: recommendations only")
        self.watcher = watcher = GradWatcher(pl_module, **options.replace(name=type(pl_module).__name__).as_kwargs())
        self._fixes.attach(trainer, pl_module, watcher)
        if trainer.is_global_zero:  # only rank zero writes; on other ranks loggers are no-ops anyway
            watcher.sinks.extend(make_sinks(trainer, watcher, self.metrics, self.log_every_n_steps))
        watcher.note_optimizers(*trainer.optimizers)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        watcher.history.context["amp_loss_scaling"] = scaler is not None
        watcher.scaler = scaler  # its loss scale is recorded on slow-stat steps (underflow finding)
        self._unscale = AmpUnscaler(scaler) if scaler is not None else None
        reducer = ShardReducer.for_trainer(trainer, pl_module, watcher, then=self._unscale)
        watcher.row_reducer = reducer if reducer is not None else self._unscale
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        self._fixes.start(trainer, watcher, self._next_step(trainer))

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
        self._fixes.before_collect(watcher)
        watcher.step(loss=loss, global_step=step)
        # With auto_fix, the auto-fixer ran inside watcher.step() above (its step callback): fixes
        # are applied here, before this optimizer step and before Lightning's clipping.
        self._fixes.after_collect(trainer, optimizer)
        if self.fail_on:
            every = self.options.diagnose_every_n_steps
            on_cadence = bool(every) and self._optimizer_steps % (every * self.options.every_n_steps) == 0
            self._fail_on.on_step(trainer, watcher, step, on_cadence, self._unscale)

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
            failing = diag is not None and self._fail_on.failing(diag, self._unscale)
            self._fail_on.decide(trainer, self.watcher, diag, int(trainer.global_step), bool(failing))

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

    def _next_step(self, trainer: Trainer | None) -> int:
        """The global step training continues at (``trainer.global_step`` is restored only after ``on_fit_start``)."""
        if self._last_step is not None:
            return self._last_step + 1
        return int(trainer.global_step) if trainer is not None else 0

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
            "seen_nonfinite": self._fail_on.seen_nonfinite,
            **self._fixes.state_dict(self._module(), watcher.optimizer, self._pending_state),
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
        self._fail_on.seen_nonfinite = int(state.get("seen_nonfinite", watcher.history.nonfinite_steps))
        optimizer = watcher.optimizer
        trainer = self._trainer()
        if optimizer is None and trainer is not None and trainer.optimizers:
            optimizer = trainer.optimizers[0]
        self._fixes.load_state_dict(state, trainer, self._module(), optimizer, self._next_step(trainer))


# -- helpers ---------------------------------------------------------------------------------------
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


__all__ = ["DEFAULT_METRICS", "GradWatchCallback", "GradientHealthError", "replay_checkpoint"]
