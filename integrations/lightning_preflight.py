"""Preflight inside a Trainer: fix the model in ``setup()``, before the optimizer is built over it.

:func:`run_preflight` draws one training batch (as ``training_step`` receives it), runs
:func:`gradwatch.preflight.probe` on it and applies the allowed fixes. With several processes rank
zero draws, probes and decides; every rank applies the same fixes (checked) and receives rank
zero's new weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from gradwatch.fixes import FixReport, apply_fixes, snapshot
from gradwatch.fixes.snapshot import Snapshot
from gradwatch.integrations import lightning_distributed as dist
from gradwatch.preflight import PreflightResult, probe, split_batch

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

    from gradwatch.findings import Diagnosis
    from gradwatch.thresholds import Thresholds


def run_preflight(
    trainer: Trainer,
    pl_module: LightningModule,
    only: Sequence[str],
    *,
    batch: Any = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    steps: int = 6,
    thresholds: Thresholds | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> tuple[PreflightResult, Snapshot]:
    """Probe ``pl_module`` on one batch and apply the fixes in ``only`` (every rank takes part).

    Args:
        batch: the batch as ``training_step`` receives it; ``None``: the first training batch.
        loss_fn: ``loss_fn(pl_module(inputs), target)`` on an ``(inputs, target)`` batch; ``None``: the
            loss ``training_step(batch, 0)`` returns.

    Returns:
        What preflight found and did, and the module tree before the fixes (to undo them if a
        checkpoint is loaded after all).

    Raises:
        RuntimeError: no batch could be drawn, or the ranks changed the model differently.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device

    param = next(pl_module.parameters())

    def probe_batch(b: Any) -> tuple[Any, Any]:
        # the batch's own (inputs, target) with loss_fn, else the whole batch as the only input of the
        # module (whose forward runs training_step)
        return split_batch(b) if loss_fn is not None else ((b,), None)

    def loss_context() -> Any:
        return contextlib.nullcontext() if loss_fn is not None else training_step_as_forward(pl_module)

    def decide() -> tuple[Diagnosis, Any]:
        drawn = batch
        if drawn is None:
            try:
                drawn = first_train_batch(trainer, pl_module)
            except Exception as exc:
                raise RuntimeError(f"GradWatchCallback(preflight=...) could not draw a training batch in setup() "
                                   f"({type(exc).__name__}: {exc}); pass preflight_batch=...") from exc
        drawn = to_module_device(pl_module, drawn)
        with loss_context():
            diagnosis = probe(pl_module, probe_batch(drawn), loss_fn if loss_fn is not None else _training_step_loss,
                              steps=steps, thresholds=thresholds)
        return diagnosis, (move_data_to_device(drawn, "cpu") if trainer.world_size > 1 else drawn)

    diagnosis, drawn = dist.from_rank_zero(trainer, decide)  # rank zero decides for every rank
    drawn = move_data_to_device(drawn, param.device)
    tree = snapshot(pl_module, tree_only=True)
    with loss_context():
        report: FixReport = apply_fixes(pl_module, diagnosis, only=only, example_input=probe_batch(drawn)[0],
                                        options=options)
    if trainer.world_size > 1:
        mine = dist.structure_fingerprint(pl_module)
        same = mine == trainer.strategy.broadcast(mine, src=0)
        if not trainer.strategy.reduce_boolean_decision(same, all=True):
            raise RuntimeError("gradwatch preflight: the ranks changed the model differently from the same "
                               "diagnosis; training would not be synchronised")
        if report.changed:
            dist.broadcast_modules(trainer, pl_module, report.touched_paths())
    return PreflightResult(diagnosis=diagnosis, report=report), tree


def _training_step_loss(output: torch.Tensor, target: Any) -> torch.Tensor:
    return output  # the module's forward runs training_step and returns its loss


def loss_of(output: Any) -> torch.Tensor:
    """The loss in what ``training_step`` returned: a tensor, or a dict's ``"loss"``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    raise TypeError(
        f"gradwatch preflight: training_step returned {type(output).__name__}, not a loss tensor or a dict with "
        "'loss'; pass GradWatchCallback(loss_fn=...) (called as loss_fn(pl_module(inputs), target))"
    )


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def training_step_as_forward(pl_module: LightningModule) -> Iterator[None]:
    """``pl_module(batch)`` runs ``training_step(batch, 0)`` and returns its loss, with ``self.log`` silenced.

    The redirection Lightning's strategies do to run ``training_step`` through a wrapper: the module's
    own ``__call__`` (and so its forward hooks) runs around ``training_step``, and the real ``forward``
    is back in place while ``training_step`` runs (it may call ``self(x)``).
    """
    names = ("forward", "log", "log_dict")
    saved = {n: pl_module.__dict__[n] for n in names if n in pl_module.__dict__}

    def restore_forward() -> None:
        pl_module.__dict__.pop("forward", None)
        if "forward" in saved:
            pl_module.__dict__["forward"] = saved["forward"]

    def redirected(batch: Any) -> torch.Tensor:
        restore_forward()
        try:
            return loss_of(pl_module.training_step(batch, 0))
        finally:
            object.__setattr__(pl_module, "forward", redirected)

    object.__setattr__(pl_module, "forward", redirected)
    object.__setattr__(pl_module, "log", _no_log)
    object.__setattr__(pl_module, "log_dict", _no_log)
    try:
        yield
    finally:
        for n in names:
            pl_module.__dict__.pop(n, None)
        pl_module.__dict__.update(saved)


def first_train_batch(trainer: Trainer, pl_module: LightningModule) -> Any:
    """One batch from the training data, as ``training_step`` would receive it (on the model's device).

    Where it comes from: the datamodule's ``train_dataloader()``, else the LightningModule's, else the
    dataloaders passed to ``trainer.fit`` (Lightning's fit-loop data source).
    """
    from lightning.pytorch.utilities.model_helpers import is_overridden

    datamodule = trainer.datamodule
    if datamodule is not None and is_overridden("train_dataloader", datamodule):
        loaders = datamodule.train_dataloader()
    elif is_overridden("train_dataloader", pl_module):
        loaders = pl_module.train_dataloader()
    else:
        source = getattr(trainer.fit_loop, "_data_source", None)  # dataloaders passed to trainer.fit(...)
        if source is None or not source.is_defined():
            raise RuntimeError("no training dataloader to draw a batch from")
        loaders = source.dataloader()
    if isinstance(loaders, list | tuple | dict):
        from lightning.pytorch.utilities import CombinedLoader

        combined = CombinedLoader(loaders, mode="max_size_cycle")
        iter(combined)
        batch = next(combined)[0]
    else:
        batch = next(iter(loaders))
    return batch


def to_module_device(pl_module: LightningModule, batch: Any) -> Any:
    """Run the module's batch-transfer hooks, as Lightning does before ``training_step``."""
    param = next(pl_module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batch = pl_module.on_before_batch_transfer(batch, 0)
    batch = pl_module.transfer_batch_to_device(batch, device, 0)
    return pl_module.on_after_batch_transfer(batch, 0)


__all__ = ["first_train_batch", "loss_of", "run_preflight", "to_module_device", "training_step_as_forward"]
