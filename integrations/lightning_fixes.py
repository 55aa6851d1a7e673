"""The fixing half of ``GradWatchCallback``: preflight, auto-fix, and what a resumed run needs of both.

:class:`TrainerFixes` keeps the fixes in effect on the model (:class:`~gradwatch.fixes.record.FixRecord`),
the Trainer's clipping and the optimizer's group layout, saves them in the callback's state and
restores them. The monitoring callback calls it from its hooks; it never reads gradients itself.

What ``GradWatchCallback(preflight=..., auto_fix=...)`` does (the default only recommends):

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
  happen in ``setup()``. For inference: :func:`gradwatch.integrations.lightning.replay_checkpoint`.

Facts this relies on (lightning 2.6):

- ``Trainer.fit(ckpt_path=...)``: callback ``setup`` -> ``configure_model`` -> the checkpoint is read
  (only now is ``trainer.ckpt_path`` set) -> ``LightningModule.load_state_dict(strict)`` -> callback
  state -> strategy setup (DDP wrap, ``configure_optimizers``) -> ``on_fit_start`` -> optimizer and
  scheduler states loaded. Structural changes are therefore replayed from a ``load_state_dict``
  pre-hook registered in ``setup``, and the optimizer's groups are rebuilt in ``on_fit_start``,
  before their saved state is loaded.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from gradwatch.fixes.record import FixRecord
from gradwatch.fixes.snapshot import Snapshot
from gradwatch.integrations import lightning_checkpoint as checkpoints
from gradwatch.integrations import lightning_distributed as dist
from gradwatch.integrations.lightning_autofix import LightningAutoFixer, TrainerClipping, mid_run_refusals
from gradwatch.integrations.lightning_optim import fit_schedulers, hyper, param_layout, regroup
from gradwatch.integrations.lightning_preflight import run_preflight
from gradwatch.preflight import PreflightResult

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

    from gradwatch.thresholds import Thresholds
    from gradwatch.watcher import GradWatcher

log = logging.getLogger(__name__)


class TrainerFixes:
    """Fixes applied inside one ``Trainer``: before training (preflight), during it (auto-fix), on resume.

    Args:
        auto_fix: fix names the auto-fixer may apply (empty: recommend only).
        preflight: fix names preflight may apply (empty: no preflight).
        options: per-fix options.
        probe_steps / verify_steps: the auto-fixer's windows.
        preflight_batch / loss_fn / preflight_steps / thresholds: see ``GradWatchCallback``.
        verbose: log preflight's result.
    """

    def __init__(self, *, auto_fix: tuple[str, ...], preflight: tuple[str, ...], options: dict[str, dict[str, Any]] | None,
                 probe_steps: int, verify_steps: int, preflight_batch: Any, loss_fn: Callable[[Any, Any], torch.Tensor] | None,
                 preflight_steps: int, thresholds: Thresholds | None, verbose: bool) -> None:
        self.auto_fix = auto_fix
        self.preflight = preflight
        self.options = options
        self.probe_steps = probe_steps
        self.verify_steps = verify_steps
        self.preflight_batch = preflight_batch
        self.loss_fn = loss_fn
        self.preflight_steps = preflight_steps
        self.thresholds = thresholds
        self.verbose = verbose
        #: What preflight found and did in the last ``setup()`` (``None`` without ``preflight``).
        self.preflight_result: PreflightResult | None = None
        #: Structural ops replayed from the checkpoint being loaded.
        self.replayed: list[dict[str, Any]] = []
        #: The fixes in effect on the model, oldest first.
        self.records: list[FixRecord] = []
        self.clipping: TrainerClipping | None = None
        self.fixer: LightningAutoFixer | None = None
        self._tree: Snapshot | None = None  # the model before this setup's preflight
        self._preflight_record: FixRecord | None = None
        self._load_hook: Any = None
        self._pre_groups: list[dict[str, Any]] | None = None
        self._trainer_ref: weakref.ReferenceType[Trainer] | None = None
        self._module_ref: weakref.ReferenceType[LightningModule] | None = None
        self._refusals: dict[str, str] = {}
        self._state_key = ""

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the Trainer's callbacks: weak references, hooks and module trees stay behind
        return {**self.__dict__, "_trainer_ref": None, "_module_ref": None, "_load_hook": None, "_tree": None, "fixer": None}

    def _trainer(self) -> Trainer | None:
        return self._trainer_ref() if self._trainer_ref is not None else None

    # -- setup: replay a checkpoint's structure, or preflight -------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str, state_key: str) -> None:
        """Replay a checkpoint's structural fixes before its weights load (every stage), or preflight (fit)."""
        self._trainer_ref = weakref.ref(trainer)
        self._state_key = state_key
        resuming = self._replay_fixes(trainer, pl_module)
        if stage == "fit" and self.preflight:
            if resuming:
                rank_zero_info("gradwatch: preflight skipped: resuming from a checkpoint, whose own record decides "
                               "the model's structure")
            else:
                self._preflight(trainer, pl_module)

    def weights_final(self) -> None:
        """The weights are loaded (``on_fit_start``, ``teardown``): preflight's changes are final."""
        self._remove_load_hook()
        self._tree = None

    def _replay_fixes(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Replay now when ``trainer.ckpt_path`` is known, else from a ``load_state_dict`` pre-hook (the path
        is set right before Lightning loads the weights strictly). Returns True when resuming is known now."""
        self._remove_load_hook()
        self.replayed = []
        path = trainer.ckpt_path
        if path:
            self._resume_structure(trainer, pl_module, path)
            return True
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._load_hook = pl_module.register_load_state_dict_pre_hook(self._before_weights_load)
        return False

    def _before_weights_load(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
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
                checkpoints.mark_applied(module, self._preflight_record, applied=False)
                self.records = [r for r in self.records if r is not self._preflight_record]
                self._preflight_record = None
            rank_zero_info("gradwatch: loading a checkpoint: this run's preflight changes were undone (the "
                           "checkpoint's record decides the model's structure)")
        try:
            data = checkpoints.read_checkpoint(path, trainer, trusted=True)
            records = checkpoints.checkpoint_records(data, self._state_key)
        except Exception as exc:  # Lightning has read it; if it needs a replay its strict load will say so
            rank_zero_warn(f"gradwatch: could not read the fix record of {path} ({type(exc).__name__}: {exc}); "
                           "a model changed by gradwatch's fixes will not load its weights")
            return
        if not records:
            return
        self.replayed = checkpoints.replay_records(module, records)
        self.records = records
        if self.replayed:
            rank_zero_info(f"gradwatch: replayed {len(self.replayed)} structural change(s) recorded in {path} "
                           f"before loading its weights: {', '.join(op['op'] + ' ' + op['path'] for op in self.replayed)}")
        if state_dict is not None:
            have, want = set(module.state_dict()), set(state_dict)
            if have != want:
                rank_zero_warn(f"gradwatch: after replaying the checkpoint's fixes the model still differs from it: "
                               f"missing {sorted(want - have)[:8]}, unexpected {sorted(have - want)[:8]}")

    def _preflight(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError("GradWatchCallback(preflight=...) with manual optimization needs loss_fn=...: "
                             "training_step steps the optimizers itself, so it cannot be probed")
        if next(pl_module.parameters(), None) is None:
            rank_zero_warn("gradwatch: preflight skipped: the LightningModule has no parameters in setup() (built in "
                           "configure_model?); call gradwatch.preflight(...) at the end of configure_model instead")
            return
        result, tree = run_preflight(trainer, pl_module, self.preflight, batch=self.preflight_batch, loss_fn=self.loss_fn,
                                     steps=self.preflight_steps, thresholds=self.thresholds, options=self.options)
        self.preflight_result = result
        if result.report.changed:
            record = FixRecord("preflight", None, result.report)
            self.records.append(record)
            checkpoints.mark_applied(pl_module, record)
            self._preflight_record, self._tree = record, tree
        if self.verbose:
            rank_zero_info(f"gradwatch preflight (before training, {self.preflight_steps} probe passes on one batch):\n"
                           f"{result}")

    # -- auto-fix --------------------------------------------------------------------------------------
    def attach(self, trainer: Trainer, pl_module: LightningModule, watcher: GradWatcher) -> None:
        """Give ``watcher`` the Lightning auto-fixer (when ``auto_fix`` and an optimizer allow it)."""
        self._trainer_ref = weakref.ref(trainer)
        self._module_ref = weakref.ref(pl_module)
        self.fixer = None
        self._refusals = {}
        if not self.auto_fix or watcher.optimizer is None:
            return
        refusals = self._refusals = mid_run_refusals(trainer, pl_module, self.auto_fix)
        allowed = tuple(f for f in self.auto_fix if f not in refusals)
        watcher.auto_fix = allowed
        self.fixer = watcher.autofixer = LightningAutoFixer(
            watcher, allowed, trainer, self._on_fix_change, probe_steps=self.probe_steps, verify_steps=self.verify_steps,
            options=self.options)
        if refusals:
            rank_zero_warn(
                f"gradwatch: auto_fix under {type(trainer.strategy).__name__} (world size {trainer.world_size}) refuses "
                + "; ".join(f"{fix} ({why})" for fix, why in refusals.items())
                + ". Preflight (GradWatchCallback(preflight=...), applied in setup() before the model is wrapped), "
                "recommendations and the other fixes still work."
            )

    def before_collect(self, watcher: GradWatcher) -> None:
        """Remember what the schedulers set, in case a rollback restores older param groups."""
        if self.fixer is not None and self.fixer.state != "done" and watcher.optimizer is not None:
            self._pre_groups = [hyper(g) for g in watcher.optimizer.param_groups]

    def after_collect(self, trainer: Trainer, optimizer: Any) -> None:
        """Right before Lightning clips: the Trainer's clipping, if the auto-fixer engaged it."""
        if self.clipping is not None:
            self.clipping.before_lightning_clips(trainer, optimizer)

    def start(self, trainer: Trainer, watcher: GradWatcher, next_step: int) -> None:
        """Training starts at ``next_step`` (after any checkpoint state was restored): the refusals are
        recorded, and clipping restored from a checkpoint (or kept from an earlier fit) is set again."""
        if self.fixer is not None and self._refusals:
            self.fixer.refuse(next_step, self._refusals)
        if self.clipping is None:
            return
        how = self.clipping.install(trainer)
        if watcher is not None:
            watcher.set_scalar("clip_threshold", self.clipping.threshold)
        rank_zero_info(f"gradwatch: gradient clipping engaged by auto_fix at step {self.clipping.step} restored: {how}")

    def _on_fix_change(self, step: int, action: str, report: Any = None) -> None:
        """The auto-fixer changed the model/optimizer (``applied``, ``rolled_back``) or engaged clipping."""
        trainer, fixer = self._trainer(), self.fixer
        module = self._module_ref() if self._module_ref is not None else None
        assert trainer is not None and module is not None and fixer is not None
        optimizer = fixer.watcher.optimizer
        if action == "clipping":
            self.clipping = fixer.clipping
            return
        if action == "applied":
            record = FixRecord("auto_fix", step, report)
            self.records.append(record)
            checkpoints.mark_applied(module, record)
            if trainer.world_size > 1:  # the same decision everywhere; re-initialised weights from rank zero
                dist.broadcast_modules(trainer, module, report.touched_paths())
        elif action == "rolled_back":
            last = next((r for r in reversed(self.records) if r.source == "auto_fix"), None)
            if last is not None:
                self.records.remove(last)
                checkpoints.mark_applied(module, last, applied=False)
            if optimizer is not None and self._pre_groups is not None:
                for group, values in zip(optimizer.param_groups, self._pre_groups, strict=False):
                    group.update(values)  # the schedule's current values, not the snapshot's older ones
        if optimizer is not None and self._pre_groups is not None:
            changed = fit_schedulers(trainer, optimizer, len(self._pre_groups))
            if changed:
                log.info("gradwatch: LR schedulers resized to %d param groups (%s)", len(optimizer.param_groups),
                         ", ".join(changed))

    # -- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self, module: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                   pending: dict[str, Any] | None) -> dict[str, Any]:
        """``fix_records``, ``optimizer_layout``, ``autofix`` and ``clipping`` for the callback's state."""
        layout = None
        if module is not None and optimizer is not None and any(r.changes_parameters for r in self.records):
            layout = param_layout(optimizer, module)
        return {
            "fix_records": [r.to_dict() for r in self.records],
            "optimizer_layout": layout,
            "autofix": self.fixer.state_dict() if self.fixer is not None else (pending or {}).get("autofix"),
            "clipping": self.clipping.state_dict() if self.clipping is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], trainer: Trainer | None, module: torch.nn.Module | None,
                        optimizer: torch.optim.Optimizer | None, next_step: int) -> None:
        """Records, auto-fixer, clipping; the optimizer regrouped as saved (before Lightning loads its state)."""
        records = state.get("fix_records")
        if records is not None:
            self.records = checkpoints.load_records(records)
        if self.fixer is not None and state.get("autofix"):
            self.fixer.load_state_dict(state["autofix"], step=next_step)
        if state.get("clipping"):
            self.clipping = TrainerClipping.from_dict(state["clipping"])
            if self.fixer is not None:
                self.fixer.restore_clipping(self.clipping)
        layout = state.get("optimizer_layout")
        if layout and optimizer is not None and module is not None and trainer is not None:
            regrouped = regroup(optimizer, module, layout)
            if regrouped is not None:
                n_before, sources = regrouped
                fit_schedulers(trainer, optimizer, n_before, sources)
                log.info("gradwatch: optimizer regrouped as saved with the checkpoint (%d -> %d param groups)", n_before,
                         len(optimizer.param_groups))


__all__ = ["TrainerFixes"]
