"""``GradWatcher`` and ``watch()``: wires collect -> history -> diagnose -> sinks for any ``nn.Module``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pandas as pd
import torch
from torch import nn

from gradwatch.activations import ACT_METRICS, LAYER_SIGNAL_METRICS, ActivationSampler
from gradwatch.collect import GRAD_METRICS, GradientCollector, PeerWatcherFailed, StepStats
from gradwatch.diagnose import diagnose as run_diagnosis
from gradwatch.diagnosis_publisher import DiagnosisPublisher, with_fix_code
from gradwatch.findings import Diagnosis
from gradwatch.histogram_rounds import HistogramRounds
from gradwatch.history import History
from gradwatch.hotpath import HostPipeline, HostRow, StepLaunch, device_rows, pack_step
from gradwatch.layer_meta import activation_layout, layer_meta
from gradwatch.layers import (
    ForwardOrderRecorder,
    LayerInfo,
    depth_order,
    discover_layers,
    structure_from_recorder,
    unwrap_model,
)
from gradwatch.optimizer_hooks import hookable_optimizer, largest_lr, optimizer_context, register_pre_hook
from gradwatch.options import WatchOptions
from gradwatch.param_changes import ParameterChanges
from gradwatch.row_reduction import RowReduction
from gradwatch.sinks import Sink
from gradwatch.step_buffer import StepBuffer
from gradwatch.step_recorder import StepRecorder
from gradwatch.structure import ModelStructure
from gradwatch.thresholds import Thresholds
from gradwatch.watch_registry import claim, release

log = logging.getLogger("gradwatch")

#: common steps recorded (history, sinks) together: whole-array appends instead of per-step work
_RECORD_BATCH = 10


class GradWatcher:
    """Watches one model's gradients: per-layer statistics every collected step, diagnosis on demand.

    Create it with :func:`gradwatch.watch`. Call :meth:`step` after ``loss.backward()`` (after
    ``GradScaler.unscale_``) and before ``optimizer.step()``, or pass ``optimizer=`` and it is called
    for you by an optimizer step pre-hook.

    Cost: a collected step reads every gradient once and copies one small tensor to the host; a
    common step (no slow statistics, activation sample, histogram or diagnosis due, every value
    finite) is recorded into :attr:`history` and the sinks together with up to 9 others, in one
    whole-array append. Reading :attr:`history`, :meth:`diagnose`, :meth:`to_dataframe` and
    :meth:`close` record pending steps first, so nothing is ever missing from what they return.

    Args:
        model: any ``nn.Module`` (``torch.compile`` and DDP wrappers are looked through).
        optimizer: if given, statistics are collected automatically right before each
            ``optimizer.step()`` (after accumulation and AMP unscaling).
        hook_optimizer: with ``False``, ``optimizer`` is only made known (auto-fix, diagnosis) and
            the caller keeps calling :meth:`step` at the right moment: for training frameworks whose
            ``optimizer.step(closure)`` runs backward inside the step, after any pre-hook.
        log_dir: a directory path or an existing ``SummaryWriter``: TensorBoard output.
        every_n_steps: collect every n-th step (steps in between cost nothing).
        slow_stats_every_n: max and mean |g|, zero fractions and weight norms run every n-th
            collected step, update ratios on the step after (L2 norms, grad-to-weight ratios and
            non-finite counts run on every one: they cost one read of the gradients). ``1`` measures
            every statistic on every step.
        activations: measure activations (dead units, saturation, signal size) on sampled steps.
        activation_every_n_steps: sample activations every n-th collected step (the first always).
        histogram_every_n_steps: TensorBoard histogram cadence (collected steps; 0 = never).
        histogram_max_elements: at most this many gradient elements are binned on one step: a
            round of histograms is spread over the steps that follow its start, in depth order, each
            layer binned once and logged under the step it was binned at (binning costs 2-4 ns an
            element on a CPU core: 2**20 elements keep a step's share near 5 ms). Raised as needed so
            a round ends within ``histogram_every_n_steps``. ``None``: every layer on the round's
            first step.
        figure_every_n_steps: TensorBoard gradient-flow figure cadence (0 = only at close).
        diagnose_every_n_steps: recompute the diagnosis (for logs, auto-fix) every n collected steps.
        thresholds: diagnosis thresholds (:class:`gradwatch.Thresholds`).
        history_capacity: recent collected steps kept in full (memory bound, see ``History``).
        track_updates: measure the update-to-weight ratio (keeps one weight copy between
            a slow-stat step and the next collected step).
        auto_fix: ``False`` (recommend only), ``True`` or a list of fix names allowed to be applied
            (see :mod:`gradwatch.autofix`: probe, apply once, verify, roll back if worse; needs
            ``optimizer=``).
        auto_fix_probe_steps: collected steps observed before deciding on fixes.
        auto_fix_verify_steps: collected steps trained after a fix before judging it.
        auto_fix_options: per-fix options, e.g. ``{"swap_activation": {"to": "leaky_relu"}}``.
        on_error: ``"detach"`` (default: log one clear message, remove all hooks, training goes on)
            or ``"raise"``.
        name: a label for logs.
        sinks: extra sinks receiving every record.
        scaler: the run's ``torch.amp.GradScaler`` (fp16 mixed precision): its loss scale is recorded
            on slow-stat steps for the ``underflow`` finding (its device tensor rides along in the
            step's host copy: no sync), and non-finite steps are read as the overflow-skipped steps
            they are.
        hot_path: ``"auto"`` (default), ``"host"`` or ``"accelerator"``. The accelerator path
            (chosen by ``"auto"`` for gradients not on the CPU) never waits for the device on a
            collected step: its statistics reach :attr:`history` and the sinks once their copy to
            the host has completed (checked at the next step; reading :attr:`history`,
            :meth:`diagnose` or :meth:`close` waits for them), and a layer with non-finite
            gradients is recorded with ``nonfinite`` = 1 (at least one; counting needs the
            gradients, gone by then). ``"accelerator"`` on CPU tensors runs that same path.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` / ``optimizer`` not a ``torch.optim.Optimizer``.
        ValueError: the model has no parameters, or an option is out of range.
        RuntimeError: the model is already watched by another open watcher.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        hook_optimizer: bool = True,
        log_dir: Any = None,
        every_n_steps: int = 1,
        slow_stats_every_n: int = 10,
        activations: bool = True,
        activation_every_n_steps: int = 50,
        histogram_every_n_steps: int = 100,
        histogram_max_elements: int | None = 1 << 20,
        figure_every_n_steps: int = 2000,
        diagnose_every_n_steps: int = 100,
        thresholds: Thresholds | None = None,
        history_capacity: int = 1000,
        track_updates: bool = True,
        auto_fix: bool | Iterable[str] = False,
        auto_fix_probe_steps: int = 50,
        auto_fix_verify_steps: int = 50,
        auto_fix_options: dict[str, dict[str, Any]] | None = None,
        on_error: str = "detach",
        name: str | None = None,
        sinks: Iterable[Sink] = (),
        scaler: Any = None,
        hot_path: str = "auto",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"gradwatch.watch expects a torch.nn.Module, got {type(model).__name__}")
        #: Every option, validated (:class:`gradwatch.options.WatchOptions`).
        self.options = opts = WatchOptions(
            optimizer=optimizer, hook_optimizer=hook_optimizer, log_dir=log_dir, every_n_steps=every_n_steps,
            slow_stats_every_n=slow_stats_every_n, activations=activations,
            activation_every_n_steps=activation_every_n_steps, histogram_every_n_steps=histogram_every_n_steps,
            histogram_max_elements=histogram_max_elements, figure_every_n_steps=figure_every_n_steps,
            diagnose_every_n_steps=diagnose_every_n_steps, thresholds=thresholds, history_capacity=history_capacity,
            track_updates=track_updates, auto_fix=auto_fix, auto_fix_probe_steps=auto_fix_probe_steps,
            auto_fix_verify_steps=auto_fix_verify_steps, auto_fix_options=auto_fix_options, on_error=on_error,
            name=name, sinks=sinks, scaler=scaler, hot_path=hot_path,
        )
        self.every_n_steps = opts.every_n_steps
        self.slow_stats_every_n = opts.slow_stats_every_n
        self.activation_every_n_steps = opts.activation_every_n_steps
        self._histograms = HistogramRounds(opts.histogram_every_n_steps, opts.histogram_max_elements)
        self.figure_every_n_steps = opts.figure_every_n_steps
        self.diagnose_every_n_steps = opts.diagnose_every_n_steps
        self.model = unwrap_model(model)
        self.name = name or type(self.model).__name__
        self.thresholds = thresholds or Thresholds()
        self.activations_enabled = bool(activations)
        self.on_error = on_error
        self.auto_fix: tuple[str, ...] = opts.auto_fix  # type: ignore[assignment]
        self.optimizer = optimizer
        self.hot_path = hot_path
        #: host copies of launched steps not recorded yet (delayed on the accelerator path)
        self._pipeline = HostPipeline()
        self._history = History(capacity=history_capacity)
        #: common steps whose recording (history, sinks) is batched: the one buffer before the disk
        self._buffer = StepBuffer(_RECORD_BATCH)
        self._sinks: list[Sink] = list(sinks)
        self._step_recorder = StepRecorder(self._history, self._sinks)
        self._publisher = DiagnosisPublisher(self._sinks)
        self.error: str | None = None
        self.closed = False
        self.calls = 0            # step() calls
        self.collected = 0        # collected steps
        self._structure = ModelStructure()
        self._track_updates = track_updates
        self._warned: set[str] = set()
        self._handles: list[Any] = []
        self._forward_order: ForwardOrderRecorder | None = None
        self._sampler: ActivationSampler | None = None
        self._param_changes = ParameterChanges(self.model)
        self._step_callbacks: list[Callable[[GradWatcher, int], None]] = []
        self._pending_loss: Any = None
        self._reduction = RowReduction()

        layers = discover_layers(self.model)
        if not layers:
            raise ValueError(
                f"gradwatch.watch: {type(self.model).__name__} has no parameters, so there are no gradients to watch. "
                "Pass the module that owns the trainable parameters."
            )
        if not any(p.requires_grad for layer in layers for p in layer.params):
            log.warning("gradwatch: every parameter of %s is frozen (requires_grad=False); no gradients will be recorded "
                        "until some are unfrozen", self.name)
        claim(self.model, self)
        self.history.context.update(optimizer_context(*([optimizer] if optimizer is not None else [])))
        self.history.context["lr"] = largest_lr(optimizer)
        self.scaler = scaler
        if scaler is not None:
            self.history.context["amp_loss_scaling"] = bool(getattr(scaler, "is_enabled", lambda: True)())
        self._set_layers(layers)
        self._forward_order = ForwardOrderRecorder(self.model, on_done=self._on_first_forward)
        if self.activations_enabled and self._is_sample(0):
            self._sampler_arm()
        self._hook_optimizer = bool(hook_optimizer)
        if optimizer is not None and self._hook_optimizer:
            self._handles.append(register_pre_hook(hookable_optimizer(optimizer), self._optimizer_pre_hook))
        self.autofixer = None
        if self.auto_fix:
            if optimizer is None:
                raise ValueError("auto_fix needs optimizer=: fixes that add parameters must tell the optimizer, and "
                                 "rollback restores its state. Pass gradwatch.watch(model, optimizer=opt, auto_fix=...).")
            from gradwatch.autofix import AutoFixer

            self.autofixer = AutoFixer(self, self.auto_fix, probe_steps=auto_fix_probe_steps,
                                       verify_steps=auto_fix_verify_steps, options=opts.auto_fix_options)
        if log_dir is not None:
            from gradwatch.tensorboard import TensorBoardSink

            self.sinks.append(TensorBoardSink(log_dir, watcher=self))

    # -- set-up --------------------------------------------------------------------------------
    def _set_layers(self, layers: list[LayerInfo]) -> None:
        if getattr(self, "_buffer", None) or getattr(self, "_pipeline", None):
            self._drain()  # recorded under the layers they were measured with
        order = self._forward_order.order if self._forward_order is not None and self._forward_order.done else self._structure.order
        self.layers = depth_order(layers, order)
        self._param_changes.remember(self.layers)
        self.collector = GradientCollector(self.layers, track_updates=self._track_updates, hot_path=self.hot_path)
        acts = activation_layout(self.model, self.layers, order, self._structure)
        self._step_recorder.set_layers([layer.name for layer in self.layers], layer_meta(self.layers), acts.names,
                                       acts.meta)
        if not self.activations_enabled:
            self._sampler = None
        elif self._sampler is None:
            self._sampler = ActivationSampler(self.model, acts.modules, self.layers, acts.channel_first)
        else:
            self._sampler.update(acts.modules, self.layers, acts.channel_first)

    def _on_first_forward(self, recorder: ForwardOrderRecorder) -> None:
        try:
            self._structure = structure_from_recorder(self.model, recorder)
            self._set_layers(discover_layers(self.model))
        except Exception as exc:  # never break the user's forward pass
            self._fail(exc)

    def _sampler_arm(self) -> None:
        if self._sampler is not None and not self.closed:
            self._sampler.arm()

    def _is_sample(self, collected_index: int) -> bool:
        return collected_index % self.activation_every_n_steps == 0

    # -- the hot path --------------------------------------------------------------------------
    def _optimizer_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        loss, self._pending_loss = self._pending_loss, None
        self._step(loss=loss, global_step=None)

    def step(self, loss: torch.Tensor | float | None = None, global_step: int | None = None) -> None:
        """Collect statistics of the current gradients (call after backward, before ``optimizer.step()``).

        Args:
            loss: optional loss of this step (a tensor is copied together with the statistics,
                without an extra device sync); used in logs and by auto-fix verification.
            global_step: the step number to record (defaults to the number of ``step()`` calls).
        """
        if self.optimizer is not None and self._hook_optimizer:
            # the optimizer's pre-hook collects; a loss given here is recorded with that collection
            if loss is not None:
                self._pending_loss = loss
            elif "manual-step" not in self._warned:
                self._warned.add("manual-step")
                log.info("gradwatch: watcher was given optimizer=, so statistics are collected by its step pre-hook; "
                         "step() without a loss does nothing (step(loss) records the loss for auto-fix and logs)")
            return
        self._step(loss=loss, global_step=global_step)

    def _step(self, loss: Any, global_step: int | None) -> None:
        if self.closed:
            return
        if self.error is not None:
            if self._reduction.abstaining:  # a stopped watcher still takes part in the others' reductions
                call = self.calls
                self.calls += 1
                if call % self.every_n_steps == 0:
                    self._reduction.abstain()
            return
        call = self.calls
        self.calls += 1
        if call % self.every_n_steps:
            self._arm_for_next_call()
            return
        index = self.collected
        self._reduction.begin_step()
        try:
            self._collect(call if global_step is None else int(global_step), loss)
        except Exception as exc:
            self._fail(exc)
        finally:
            if self.collected == index and self.history.total_steps > index and not self.closed and self.error is None:
                # interrupted (e.g. KeyboardInterrupt) after the step reached the history: keep the
                # counters in line with it so cadences and the next sampled forward stay right
                self._after_step(index)

    def _collect(self, step: int, loss: Any) -> None:
        index = self.collected
        slow = index % self.slow_stats_every_n == 0
        if slow and self._param_changes.changed():
            log.info("gradwatch: the parameters of %s changed since watch(); re-discovering layers", self.name)
            self._set_layers(discover_layers(self.model))
        self._pipeline.read(self.collector, self._consume)  # earlier delayed steps complete by now (no waiting)
        partials = self._reduction.reduce(device_rows(self.collector.compute_on_device(slow)))
        if not partials:
            if "no-grad" not in self._warned:
                self._warned.add("no-grad")
                log.warning("gradwatch: step() found no gradients on %s; call it after loss.backward() and before "
                            "optimizer.zero_grad()", self.name)
            self._after_step(index)
            return
        device = partials[0].device
        sample = None
        if self._sampler is not None and self._sampler.captured:
            sample = self._sampler.gather(device)
        scale = self._loss_scale(step) if slow else None
        packed = pack_step(partials, sample, loss, scale)  # one host copy: rows + activation sample + loss (+ scale)
        # histogram rounds only where a sink can write them (they also keep steps out of batched recording)
        hist_round = self._histograms.starts_at(index, writable=bool(self.sinks))
        launch = self._pipeline.launch(
            self.collector, packed, step=step, slow=slow, keep_out=hist_round or self._histograms.in_progress,
            diagnosing=bool(self.diagnose_every_n_steps) and bool(index) and index % self.diagnose_every_n_steps == 0,
            on_row=self._consume,
        )
        delayed = self._pipeline.delayed
        if not delayed:
            self._pipeline.read(self.collector, self._record_row)
        if hist_round:
            self._histograms.start(self.layers)
        if self._histograms.in_progress:
            layers = self._histograms.next_layers(self.layers)
            if layers:  # (binned on the device; on an accelerator written once their counts reached the host)
                for sink in self.sinks:
                    sink.write_histograms(step, layers)
        if not delayed:
            self._after_record(launch)
        self._after_step(index)

    def _loss_scale(self, step: int) -> torch.Tensor | None:
        """The ``GradScaler``'s scale on a slow-stat step: its device tensor, to ride along in the step's
        host copy (``get_scale()`` is a host read: a device sync); before the scaler made that tensor,
        or with another kind of scaler, recorded at once."""
        if self.scaler is None:
            return None
        enabled = getattr(self.scaler, "is_enabled", lambda: True)()
        scale = getattr(self.scaler, "_get_scale_async", lambda: None)() if enabled else None
        if isinstance(scale, torch.Tensor):
            return scale
        self.note_loss_scale(self.scaler.get_scale(), step)
        return None

    def _consume(self, row: HostRow, launch: StepLaunch) -> None:
        """Record a launched step read back on the host, then run what follows a recorded step."""
        self._record_row(row, launch)
        self._after_record(launch)

    def _record_row(self, row: HostRow, launch: StepLaunch) -> None:
        if row.loss_scale is not None:
            self.note_loss_scale(row.loss_scale, launch.step)
        if row.stats.fast and row.sample is None and not self._step_callbacks and not launch.keep_out \
                and not launch.diagnosing:
            # a common step: recorded with the next ones, in one batch (whole-array history appends)
            self._buffer.add(launch.step, row.stats, row.loss)
            if self._buffer.full:
                self._record_buffer()
        else:
            self._record_buffer()
            self._record(launch.step, row.stats, row.loss, row.sample)

    def _after_record(self, launch: StepLaunch) -> None:
        for cb in list(self._step_callbacks):
            cb(self, launch.step)
        if launch.diagnosing:
            self._publisher.publish(launch.step, self._diagnose())

    def _after_step(self, index: int) -> None:
        self.collected = index + 1
        self._arm_for_next_call()

    def _arm_for_next_call(self) -> None:
        """Attach the activation hooks iff the next ``step()`` call is collected *and* sampled, so they
        exist only during that step's forward pass (none on steps skipped by ``every_n_steps``)."""
        if (self._sampler is not None and not self.closed and self.calls % self.every_n_steps == 0
                and self._is_sample(self.collected)):
            self._sampler_arm()

    @property
    def history(self) -> History:
        """Everything recorded so far (delayed copies are waited for and batched steps recorded first)."""
        if self._buffer or self._pipeline:
            try:
                self._drain()
            except Exception as exc:
                self._fail(exc)
        return self._history

    def record_pending(self) -> None:
        """Record the steps still in flight or batched (history and sinks) now; reading
        :attr:`history`, :meth:`diagnose` or :meth:`close` does it anyway. Sinks call it at
        interpreter exit."""
        if (self._buffer or self._pipeline) and not self.closed:
            self._drain()

    def _drain(self) -> None:
        """Wait for the launched copies, record them, then the batched steps."""
        self._pipeline.read(self.collector, self._consume, wait=True)
        self._record_buffer()

    def _record_buffer(self) -> None:
        """Record the buffered common steps: one whole-array history append, then the sinks."""
        if self._buffer:
            self._step_recorder.write_batch(self._buffer.take())

    def _record(self, step: int, stats: StepStats, loss: float, sample: torch.Tensor | None) -> None:
        act_values = signal = None
        if sample is not None and self._sampler is not None:
            act_t, sig_t = self._sampler.split(sample.to(torch.float64))
            act_values, signal = act_t.numpy(), sig_t.numpy()
        self._step_recorder.write(step, stats, loss, act_values, signal)

    def _fail(self, exc: BaseException) -> None:
        peer = isinstance(exc, PeerWatcherFailed)
        self._reduction.note_failure()
        if peer:  # the steps read after the one that told (all reduced without the failed rank's part)
            self._pipeline.discard()
        if self.on_error == "raise":
            raise exc
        self.error = f"{type(exc).__name__}: {exc}"
        if peer:
            log.warning("gradwatch: watching %s stopped: %s (its error is logged there); statistics up to here are "
                        "kept, training continues unaffected", self.name, exc)
        else:
            log.error("gradwatch: watching %s failed (%s); gradwatch detached itself, training continues unaffected. "
                      "Statistics up to here are kept.", self.name, self.error)
        self._detach()

    @property
    def row_reducer(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Optional cross-process reduction of the per-device statistic rows before the host copy, for
        sharded parameters (FSDP): ``fn(rows) -> rows`` (see ``collect.reduce_sharded_rows``). A
        collective one also has ``abstain()``: once this watcher stopped (it failed, or a peer did), it is
        called instead at every collected step (it sends zero rows and the failure flag), so the others
        learn of it from the rows they read (``collect.PeerWatcherFailed``) and no rank ever waits for
        another in the collective."""
        return self._reduction.reducer

    @row_reducer.setter
    def row_reducer(self, reducer: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self._reduction.reducer = reducer

    @property
    def sinks(self) -> list[Sink]:
        """Where each step goes besides the history (one list, shared with the recording and publishing)."""
        return self._sinks

    @sinks.setter
    def sinks(self, sinks: Iterable[Sink]) -> None:
        self._sinks[:] = list(sinks)

    @property
    def histogram_every_n_steps(self) -> int:
        """TensorBoard histogram cadence in collected steps (0: never)."""
        return self._histograms.every_n_steps

    @property
    def histogram_max_elements(self) -> int | None:
        """Gradient elements binned on one step at most (``None``: a whole round on its first step)."""
        return self._histograms.max_elements

    # -- results -------------------------------------------------------------------------------
    @property
    def structure(self) -> ModelStructure:
        """The forward pass observed on the first step (empty until then): order, shapes, types."""
        return self._structure

    @structure.setter
    def structure(self, value: ModelStructure | Mapping[str, Any]) -> None:
        """Restore a recorded structure (e.g. from a checkpoint's plain-dict form)."""
        self._structure = ModelStructure.from_dict(value)

    def set_scalar(self, name: str, value: float) -> None:
        """Attach an extra scalar (e.g. a clipping threshold) to the following step records."""
        self._drain()  # earlier steps keep the value they had
        self._step_recorder.extra[name] = float(value)

    def relayer(self) -> None:
        """Re-discover layers after the model changed (a fix), and re-record depth on the next forward."""
        if self._forward_order is not None:
            self._forward_order.remove()
        self._set_layers(discover_layers(self.model))
        if not self.closed:
            self._forward_order = ForwardOrderRecorder(self.model, on_done=self._on_first_forward)

    def add_step_callback(self, fn: Callable[[GradWatcher, int], None]) -> None:
        """Call ``fn(watcher, step)`` after each collected step (used by auto-fix and integrations)."""
        self._step_callbacks.append(fn)

    # -- integration hooks (training frameworks) -------------------------------------------------
    def forward_done(self) -> None:
        """Mark the end of a forward pass in which the watched model's own ``forward`` was not called.

        The one-shot hooks that record the forward order and sample activations end when the model's
        ``forward`` returns. A framework that runs submodules without calling it (a LightningModule
        whose ``training_step`` calls ``self.net(x)``) calls this once the forward pass is over
        (before backward) instead. A no-op when nothing is pending.
        """
        if self.closed:
            return
        recorder = self._forward_order
        if recorder is not None and not recorder.done and recorder.order:
            recorder.finish_forward()
        if self._sampler is not None and self._sampler.armed:
            self._sampler.finish_forward()

    def note_loss_scale(self, scale: float, step: int | None = None) -> None:
        """Record the AMP loss scale in force at ``step`` (default: the next step to be collected); the
        Lightning callback and ``watch(scaler=...)`` call it. A scale means fp16 loss scaling is on."""
        if self.closed:
            return
        self._history.context["amp_loss_scaling"] = True  # no drain: a scale needs no statistics
        self._history.record_loss_scale(self.calls if step is None else int(step), float(scale))

    def note_optimizers(self, *optimizers: torch.optim.Optimizer) -> None:
        """Tell the diagnosis which optimizer(s) update the model, without hooking them (the caller
        collects). Adam-like optimizers are invariant to gradient scale, which changes the fixes."""
        self.history.context.update(optimizer_context(*optimizers))

    def diagnose(self, thresholds: Thresholds | None = None) -> Diagnosis:
        """Diagnose the most recent ``thresholds.window`` collected steps."""
        self.history  # noqa: B018 - waits for delayed copies, records batched steps
        return self._diagnose(thresholds)

    def _diagnose(self, thresholds: Thresholds | None = None) -> Diagnosis:
        """:meth:`diagnose` of what is recorded (steps in flight are not waited for: no device sync)."""
        self._record_buffer()
        th = thresholds or self.thresholds
        view = self._history.view(last=th.window, last_samples=max(3, th.window // max(1, self.activation_every_n_steps) + 1),
                                 active_only=True, lookback=th.spike_lookback)
        diag = run_diagnosis(view, th, structure=self._structure.to_dict())
        return with_fix_code(self.model, self._structure, diag)

    def to_dataframe(self, include_long_term: bool = False) -> pd.DataFrame:
        """Long format ``step, layer, metric, value`` (plus ``depth``) of everything kept in history."""
        return self.history.to_dataframe(include_long_term=include_long_term)

    def summary(self) -> pd.DataFrame:
        """Wide per-layer view (one row per layer in depth order; medians over the recent window)."""
        return self.history.summary_frame(last=self.thresholds.window)

    # -- teardown ------------------------------------------------------------------------------
    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._forward_order is not None:
            self._forward_order.remove()
        if self._sampler is not None:
            self._sampler.close()
        self.collector.release_snapshot()

    def close(self) -> None:
        """Remove every hook, write the final diagnosis and figure, flush and close the sinks. Idempotent."""
        if self.closed:
            return
        try:
            self._drain()  # steps in flight are recorded (and their callbacks run) while still attached
        except Exception as exc:
            log.error("gradwatch: recording the last steps failed: %s", exc)
        self._detach()
        try:
            if self.sinks and self.history.total_steps:
                step = int(self.history.view(last=1).steps[-1])
                self._publisher.publish_final(step, self.diagnose())
        except Exception as exc:  # closing must not raise from inside a finally block
            log.error("gradwatch: final diagnosis failed: %s", exc)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.error("gradwatch: closing sink %s failed: %s", type(sink).__name__, exc)
        self.closed = True
        release(self.model, self)

    def __enter__(self) -> GradWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            if not self.closed:
                self._detach()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"GradWatcher({self.name!r}, layers={len(self.layers)}, collected={self.collected}, closed={self.closed})"


def check_watch_options(options: Mapping[str, Any], *, exclude: Iterable[str] = (),
                        caller: str = "gradwatch.watch") -> None:
    """Validate :func:`watch` keyword options before there is a model to watch.

    Kept for callers of earlier versions: :meth:`gradwatch.options.WatchOptions.build` does the same and
    returns the options.

    Raises:
        TypeError: an unknown or excluded option name, or a wrongly typed value.
        ValueError: a count or cadence out of range, an unknown ``on_error`` or fix name.
    """
    WatchOptions.build(caller, exclude=exclude, **options)


def watch(model: nn.Module, **kwargs: Any) -> GradWatcher:
    """Start watching ``model``'s gradients. See :class:`GradWatcher` for the keyword arguments.

    Example:
        >>> watcher = gradwatch.watch(model)
        >>> loss.backward(); watcher.step(); optimizer.step()
        >>> print(watcher.diagnose())
    """
    return GradWatcher(model, **kwargs)



__all__ = ["GradWatcher", "watch", "check_watch_options", "GRAD_METRICS", "ACT_METRICS", "LAYER_SIGNAL_METRICS"]
