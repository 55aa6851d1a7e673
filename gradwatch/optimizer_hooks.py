"""The optimizer a watcher hooks, and what the diagnosis needs to know about the optimizers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: Optimizers whose steps are invariant to the gradients' scale: clipping does not cure what they suffer from.
SCALE_INVARIANT_OPTIMIZERS = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "Adafactor",
                              "SparseAdam")


def hookable_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``step()`` really updates the weights, for the step pre-hook.

    Wrappers such as accelerate's ``AcceleratedOptimizer`` subclass ``torch.optim.Optimizer`` without
    running its ``__init__`` (so they cannot take hooks) and keep the real optimizer in ``.optimizer``.
    Hooking the wrapped optimizer is also what makes the collection right under them: its ``step()``
    runs only on steps where gradients are synchronised (``accelerator.accumulate``), and under fp16
    mixed precision only after ``GradScaler`` unscaled the gradients (an overflow step, which the
    scaler skips, is not collected). Its class name is also the one the diagnosis needs (Adam-like
    optimizers are invariant to gradient scale).
    """
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer) and inner.optimizer is not inner:
        inner = inner.optimizer
    return inner


def register_pre_hook(optimizer: torch.optim.Optimizer, hook: Callable[..., None]) -> Any:
    """``register_step_pre_hook`` on ``optimizer``, or a gradwatch error saying what to do instead."""
    try:
        return optimizer.register_step_pre_hook(hook)
    except AttributeError as exc:
        raise TypeError(
            f"gradwatch.watch(optimizer=...): {type(optimizer).__name__} does not support optimizer step hooks "
            f"({exc}); it subclasses torch.optim.Optimizer without initialising it and wraps no optimizer that "
            "does. Pass the underlying torch optimizer, or pass hook_optimizer=False and call watcher.step() "
            "after backward and before optimizer.step() yourself."
        ) from None


def optimizer_context(*optimizers: torch.optim.Optimizer) -> dict[str, Any]:
    """The history context entries naming the optimizers (``None`` when there is none): whether all of
    them are invariant to gradient scale decides which fixes the diagnosis recommends."""
    names = [type(hookable_optimizer(opt)).__name__ for opt in optimizers]
    return {
        "optimizer": ", ".join(dict.fromkeys(names)) if names else None,
        "optimizer_scale_invariant": all(n in SCALE_INVARIANT_OPTIMIZERS for n in names) if names else None,
    }


def largest_lr(optimizer: torch.optim.Optimizer | None) -> float | None:
    """The largest numeric learning rate of ``optimizer``'s parameter groups, or ``None``."""
    lrs = [g.get("lr") for g in optimizer.param_groups] if optimizer is not None else []
    values = [float(v) for v in lrs if isinstance(v, int | float)]
    return max(values) if values else None
