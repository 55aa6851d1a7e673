r"""
GradWatch Trainer Callback
==========================

Per-layer gradient statistics and a gradient-flow diagnosis for a Hugging Face ``transformers.Trainer``:
a thin callback over the framework-free :class:`gradwatch.GradWatcher`.

"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers import TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from gradwatch.findings import FINDING_KINDS, Diagnosis
from gradwatch.fixes.clipping import clip_to_norm_, global_norm
from gradwatch.integrations.gloo_exit import destroy_gloo_group_at_exit
from gradwatch.options import WatchOptions, check_names
from gradwatch.report import for_logs
from gradwatch.watcher import GradWatcher

if TYPE_CHECKING:
    import pandas as pd
    from transformers import TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

#: ``gradwatch.watch`` options that do not apply inside a Trainer (it owns the model, the optimizer and
#: the loop; fixes during training are not supported by this callback yet).
_NOT_APPLICABLE = ("optimizer", "hook_optimizer", "sinks", "auto_fix", "auto_fix_probe_steps",
                   "auto_fix_verify_steps", "auto_fix_options")
#: File in each ``checkpoint-N`` folder holding the callback's state (history, clipping, skipped steps).
STATE_FILE = "gradwatch_state.pt"
_STATE_VERSION = 1
#: accelerate distributed types under which the callback clips in place of the Trainer: those where
#: ``Trainer`` clips with a plain global-norm clip over ``model.parameters()`` (FSDP, DeepSpeed and XLA
#: clip inside their own engines, with sharded or partitioned gradients).
_PLAIN_CLIPPING = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                   "MULTI_NPU", "MULTI_HPU")


def _distributed_type() -> str:
    from accelerate.state import AcceleratorState

    try:
        return str(getattr(AcceleratorState().distributed_type, "value", AcceleratorState().distributed_type))
    except Exception:  # no accelerator state yet: a single process
        return "NO"


class GradWatchTrainerCallback(TrainerCallback):
    r"""Watch the model's gradients during ``Trainer.train``: per-layer statistics, TensorBoard, diagnosis.

    Statistics are collected once per optimizer step, after gradient accumulation, after DDP's
    all-reduce and AMP unscaling, and **before clipping**: ``Trainer`` clips before any callback
    sees the gradients, so when ``max_grad_norm > 0`` this callback takes the clipping over for
    the run - it sets ``args.max_grad_norm`` to 0 in ``on_train_begin`` (restored in
    ``on_train_end``, in the ``training_args.bin`` of checkpoints, and at the next ``train()`` if one
    ended by an exception), collects in ``on_pre_optimizer_step`` and then clips with the same threshold
    and formula (global L2 norm, ``min(1, max_norm / (norm + 1e-6))``). The Trainer's own ``grad_norm``
    log stays the pre-clip norm, as before. ``clip_threshold/total`` is logged with every step and
    :attr:`clipped_steps` lists the steps on which clipping engaged. Under FSDP, DeepSpeed and XLA the
    engines clip sharded gradients themselves: the Trainer keeps clipping and the statistics are of
    the clipped gradients (an info message says so).

    Where the numbers go (global rank zero only; every rank collects identical statistics):

    - TensorBoard, under the same tags as the other integrations (``grad_norm/<layer>``,
      ``grad_norm/total``, histograms, the dashboard layout, the gradient-flow figure, the diagnosis as
      text), into ``log_dir`` if given, else the directory the Trainer's own TensorBoard callback
      writes to when ``report_to`` includes ``"tensorboard"``: ``$TENSORBOARD_LOGGING_DIR``, else
      ``args.logging_dir`` (transformers 4.x), else the newest ``output_dir/runs/<time>_<host>``
      folder that callback created. HF's curves and gradwatch's are then in one run.
    - Other ``report_to`` targets (W&B, MLflow, none): nothing is written; ``callback.diagnosis``,
      ``callback.to_dataframe()`` and the logs still work.

    The diagnosis goes to the ``logging`` logger ``gradwatch.integrations.transformers`` (where HF's
    own messages go): whenever the findings change (checked every ``diagnose_every_n_steps``
    collected steps) and at the end of training - one line when healthy, the full report (findings,
    evidence, fixes, per-layer table) otherwise.

    Mixed precision: ``fp16`` statistics are of unscaled gradients (transformers 5 unscales before any
    callback runs, when it measures the gradient norm; 4.x only unscales when it clips, and fp16 with
    a ``GradScaler`` needs a GPU: that path is not covered by the CPU test suite); a step the ``GradScaler`` skips for overflow is listed in :attr:`skipped_steps`
    and is loss-scale calibration, not a failure, for ``fail_on`` until the scale falls below 1.
    ``bf16`` needs no scaler.

    Checkpoints: on every save the history and the clipping/overflow records are written to
    ``STATE_FILE`` in the ``checkpoint-N`` folder; ``trainer.train(resume_from_checkpoint=...)``
    continues them.

    Fixes: this callback recommends (the diagnosis carries the fixes and copy-pasteable code); it does
    not apply fixes during training. To fix before training, run :func:`gradwatch.preflight` on the
    model and one batch before building the ``Trainer`` (which then builds its optimizer over the fixed
    model): ``gradwatch.preflight(model, (batch, None), lambda output, _: output.loss)``.

    Args:
        fail_on: finding kinds that stop training through ``control.should_training_stop`` (any of
            ``gradwatch.findings.FINDING_KINDS``). ``"nonfinite"`` is checked on every collected step,
            the others when the diagnosis is computed. :attr:`stop_reason` says why. Default: ``()``.
        log_dir: TensorBoard directory; ``None`` follows ``report_to`` as described above. Default: ``None``.
        verbose: log the diagnosis when it changes and at the end of training. Default: ``True``.
        **watch_options: any option of :func:`gradwatch.watch` that applies inside a Trainer
            (``every_n_steps``, ``slow_stats_every_n``, ``activations``, ``histogram_every_n_steps``,
            ``diagnose_every_n_steps``, ``thresholds``, ``history_capacity``, ``on_error``, ...), with
            the same defaults, validated by the same code.

    Raises:
        TypeError: an unknown option, or one that does not apply to a Trainer (``optimizer``,
            ``auto_fix``...), or a wrongly typed one.
        ValueError: an option out of range or an unknown finding kind in ``fail_on``.

    Example::

        >>> from transformers import Trainer, TrainingArguments
        >>> from gradwatch.integrations.transformers import GradWatchTrainerCallback
        >>> gradwatch_cb = GradWatchTrainerCallback(fail_on=("nonfinite",))
        >>> args = TrainingArguments("out", report_to="tensorboard", max_grad_norm=1.0)
        >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[gradwatch_cb])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> print(gradwatch_cb.diagnosis)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        fail_on: str | Iterable[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
        verbose: bool = True,
        **watch_options: Any,
    ) -> None:
        #: The ``gradwatch.watch`` options the watcher is created with (validated here, at construction).
        self.options = WatchOptions.build("GradWatchTrainerCallback", exclude=_NOT_APPLICABLE, **watch_options)
        self.fail_on = check_names("GradWatchTrainerCallback: fail_on", fail_on, FINDING_KINDS, what="finding kind")
        if log_dir is not None and not isinstance(log_dir, str | os.PathLike):
            raise TypeError(f"GradWatchTrainerCallback: log_dir must be a directory path or None, got {type(log_dir).__name__}")
        self.log_dir = log_dir
        self.verbose = bool(verbose)
        self.watcher: GradWatcher | None = None
        #: Why training was stopped by ``fail_on`` (``None`` if it was not).
        self.stop_reason: str | None = None
        #: The clipping threshold this callback applies for the Trainer (``None``: it does not clip).
        self.clip_threshold: float | None = None
        #: Steps on which clipping engaged (the pre-clip global norm exceeded the threshold).
        self.clipped_steps: list[int] = []
        #: Steps whose optimizer update the AMP ``GradScaler`` skipped (gradient overflow).
        self.skipped_steps: list[int] = []
        self._diagnosis: Diagnosis | None = None
        self._logged_signature: tuple | None = None
        self._seen_nonfinite = 0
        self._optimizer_steps = 0  # on_pre_optimizer_step calls this run (the same count on every rank)
        self._scaler: Any = None
        self._restore_max_grad_norm: float | None = None

    # -- results -------------------------------------------------------------------------------
    @property
    def diagnosis(self) -> Diagnosis | None:
        """The latest diagnosis (on the diagnosis cadence and at the end of training)."""
        return self._diagnosis

    def diagnose(self) -> Diagnosis:
        """Diagnose the recent history now (during or after training).

        Raises:
            RuntimeError: called before training started.
        """
        if self.watcher is None:
            raise RuntimeError("GradWatchTrainerCallback.diagnose(): nothing recorded yet; call it after trainer.train()")
        self._diagnosis = self.watcher.diagnose()
        return self._diagnosis

    def to_dataframe(self, include_long_term: bool = False) -> pd.DataFrame:
        """Long format ``step, layer, metric, value, depth`` of the history (``step`` is ``state.global_step``).

        Raises:
            RuntimeError: called before training started.
        """
        if self.watcher is None:
            raise RuntimeError("GradWatchTrainerCallback.to_dataframe(): nothing recorded yet; call it after trainer.train()")
        return self.watcher.to_dataframe(include_long_term=include_long_term)

    # -- set-up --------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise RuntimeError("GradWatchTrainerCallback: the Trainer passed no model to on_train_begin")
        if args.world_size > 1:
            destroy_gloo_group_at_exit()  # a gloo group alive at interpreter exit aborts the process now and then
        if self.watcher is not None:
            self.watcher.close()
        self._diagnosis, self._logged_signature, self.stop_reason = None, None, None
        self.clipped_steps, self.skipped_steps = [], []
        self._optimizer_steps = 0
        self.watcher = GradWatcher(model, **self.options.replace(hook_optimizer=False).as_kwargs())
        watcher = self.watcher
        if optimizer is not None:
            watcher.note_optimizers(optimizer)
        self._scaler = getattr(optimizer, "scaler", None)  # AcceleratedOptimizer's GradScaler (fp16 only)
        watcher.history.context["amp_loss_scaling"] = self._scaler is not None
        self._take_over_clipping(args)
        if state.is_world_process_zero:
            directory = self._tensorboard_dir(args)
            if directory is not None:
                from gradwatch.tensorboard import TensorBoardSink

                watcher.sinks.append(TensorBoardSink(directory, watcher=watcher))
                log.info("gradwatch: TensorBoard output in %s", directory)
        if state.global_step > 0:
            self._resume(args, state)
        self._seen_nonfinite = watcher.history.nonfinite_steps
        if self.clip_threshold is not None:
            watcher.set_scalar("clip_threshold", self.clip_threshold)

    def _take_over_clipping(self, args: TrainingArguments) -> None:
        if self._restore_max_grad_norm is not None:  # an earlier train() ended by an exception held the clipping
            args.max_grad_norm = self._restore_max_grad_norm
            self._restore_max_grad_norm = None
        max_norm = float(args.max_grad_norm or 0.0)
        self.clip_threshold = None
        if max_norm <= 0:
            return
        kind = _distributed_type()
        if kind not in _PLAIN_CLIPPING:
            log.info("gradwatch: under %s the Trainer clips inside its engine; gradient statistics are of the clipped "
                     "gradients (max_grad_norm=%g)", kind, max_norm)
            return
        if self._scaler is not None and int(transformers.__version__.split(".")[0]) < 5:
            log.info("gradwatch: fp16 with transformers %s unscales gradients only when the Trainer clips; the Trainer "
                     "keeps clipping and gradient statistics are of the clipped gradients", transformers.__version__)
            return
        self.clip_threshold = max_norm
        self._restore_max_grad_norm = args.max_grad_norm
        args.max_grad_norm = 0.0  # the Trainer now only measures the norm; this callback clips after collecting

    def _tensorboard_dir(self, args: TrainingArguments) -> str | None:
        """The directory HF's own TensorBoard callback writes to (see the class docstring), or ``log_dir``."""
        if self.log_dir is not None:
            return os.fspath(self.log_dir)
        report_to = args.report_to if isinstance(args.report_to, list | tuple) else [args.report_to]
        if "tensorboard" not in report_to:
            return None
        env = os.getenv("TENSORBOARD_LOGGING_DIR")
        if env:
            return os.path.expanduser(env)
        legacy = getattr(args, "logging_dir", None)  # transformers 4.x
        if legacy:
            return os.fspath(legacy)
        runs = Path(args.output_dir) / "runs"
        made = [p for p in runs.iterdir() if p.is_dir()] if runs.is_dir() else []
        if made:  # HF's TensorBoardCallback runs first (report_to callbacks precede user callbacks)
            return os.fspath(max(made, key=lambda p: p.stat().st_mtime))
        from transformers.integrations.integration_utils import default_logdir

        return os.path.join(args.output_dir, default_logdir())

    # -- the hot path --------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: torch.nn.Module | None = None, **kwargs: Any) -> TrainerControl:
        watcher = self.watcher
        if watcher is None:
            return control
        step = int(state.global_step) + 1  # the number this update gets in HF's own logs
        self._optimizer_steps += 1
        watcher.step(global_step=step)
        if self.clip_threshold is not None and model is not None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            total = global_norm(grads)
            clip_to_norm_(grads, self.clip_threshold, total)
            if float(total) > self.clip_threshold:
                self.clipped_steps.append(step)
        if "nonfinite" in self.fail_on and watcher.history.nonfinite_steps > self._seen_nonfinite:
            self._seen_nonfinite = watcher.history.nonfinite_steps
            self._maybe_stop_on_nonfinite(control, step)
        return control

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          optimizer: Any = None, **kwargs: Any) -> None:
        if self.watcher is not None and bool(getattr(optimizer, "step_was_skipped", False)):
            self.skipped_steps.append(int(state.global_step) + 1)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        watcher = self.watcher
        # The cadence counts optimizer steps (the same on every rank, even one whose watcher detached
        # after an error), so every rank reaches the fail_on collective below together.
        every = watcher.diagnose_every_n_steps * watcher.every_n_steps if watcher is not None else 0
        if watcher is None or not every or self._optimizer_steps % every:
            return control
        diag = self.diagnose() if watcher.history.total_steps else None
        if (diag is not None and self.verbose and state.is_world_process_zero
                and diag.signature() != self._logged_signature):
            self._logged_signature = diag.signature()
            log.log(logging.INFO if diag.healthy else logging.WARNING, "gradwatch diagnosis at step %d:\n%s",
                    state.global_step, for_logs(diag))
        if not self.fail_on:
            return control
        failing = [f for f in (diag.findings if diag is not None else ())
                   if f.kind in self.fail_on and not (f.kind == "nonfinite" and self._scaler)]
        if _any_rank(bool(failing), args):
            what = "; ".join(f"{f.kind} ({f.severity}) in {', '.join(f.layers[:4]) or 'the model'}: {f.message}"
                             for f in failing) or "a finding named in fail_on appeared on another rank"
            self._stop(control, int(state.global_step), what)
        return control

    def _maybe_stop_on_nonfinite(self, control: TrainerControl, step: int) -> None:
        # Gradients are all-reduced here, so every rank sees the same non-finite values: no collective needed.
        if self._scaler is not None:
            scale = float(self._scaler.get_scale())
            if scale >= 1.0:
                return  # an fp16 overflow: the GradScaler skips this step and lowers its scale (calibration)
            reason = f"gradients stay non-finite although the AMP loss scale fell to {scale:g}"
        else:
            reason = "non-finite (NaN/Inf) gradients"
        layers = self._nonfinite_layers()
        self._stop(control, step, f"{reason} in {', '.join(layers[:4]) or 'the model'}"
                                  f"{' ...' if len(layers) > 4 else ''}")

    def _nonfinite_layers(self) -> list[str]:
        """The layers whose gradients were non-finite on the latest collected step, in depth order."""
        if self.watcher is None:
            return []
        view = self.watcher.history.view(last=1)
        if not len(view.steps):
            return []
        counts = view.metric("nonfinite")[-1]
        return [name for name, n in zip(view.layers, counts, strict=True) if n > 0]

    def _stop(self, control: TrainerControl, step: int, what: str) -> None:
        self.stop_reason = (f"gradwatch stopped training at step {step}: {what} "
                            f"(GradWatchTrainerCallback(fail_on={self.fail_on!r}); remove the kind from fail_on to keep training)")
        log.error("%s", self.stop_reason)
        control.should_training_stop = True

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.watcher is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            return
        torch.save({"version": _STATE_VERSION, "history": self.watcher.history.state_dict(),
                    "clipped_steps": list(self.clipped_steps), "skipped_steps": list(self.skipped_steps)},
                   folder / STATE_FILE)
        if self._restore_max_grad_norm is not None and (folder / TRAINING_ARGS_NAME).is_file():
            # the Trainer saved the arguments while this callback held the clipping: keep the user's value
            saved_args = copy.copy(args)
            saved_args.max_grad_norm = self._restore_max_grad_norm
            torch.save(saved_args, folder / TRAINING_ARGS_NAME)

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        """Continue the history saved with the checkpoint being resumed (``checkpoint-<global_step>``)."""
        path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / STATE_FILE
        if self.watcher is None:
            return
        if not path.is_file():
            log.info("gradwatch: resuming at step %d without a gradient history (no %s); it starts afresh",
                     state.global_step, path)
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)  # plain data and tensors only
        self.watcher.history.load_state_dict(saved["history"])
        self.clipped_steps = list(saved.get("clipped_steps", []))
        self.skipped_steps = list(saved.get("skipped_steps", []))
        log.info("gradwatch: resumed the gradient history of %s (%d steps)", path.parent, self.watcher.history.total_steps)

    # -- the end --------------------------------------------------------------------------------
    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._restore_max_grad_norm is not None:
            args.max_grad_norm = self._restore_max_grad_norm
            self._restore_max_grad_norm = None
        watcher = self.watcher
        if watcher is None or watcher.closed:
            return
        if watcher.history.total_steps:
            diag = self.diagnose()
            if self.verbose and state.is_world_process_zero:
                log.log(logging.INFO if diag.healthy else logging.WARNING,
                        "gradwatch diagnosis at the end of training (step %d):\n%s", state.global_step, for_logs(diag))
                if self.clip_threshold is not None:
                    log.info("gradwatch: clipping at max_grad_norm=%g engaged on %d of %d collected steps",
                             self.clip_threshold, len(self.clipped_steps), watcher.collected)
        watcher.close()


def _any_rank(flag: bool, args: TrainingArguments) -> bool:
    """``flag`` from any process (a stop decision every rank must take together)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=args.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


__all__ = ["GradWatchTrainerCallback", "STATE_FILE"]
