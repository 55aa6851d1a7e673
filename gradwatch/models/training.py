"""The plain training loop of a reference case, and the smoothed final loss the fixes are judged by."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from gradwatch.models.case import ReferenceCase


def train(
    case: ReferenceCase,
    steps: int | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    on_backward: Callable[[int], None] | None = None,
    on_loss: Callable[[int, Tensor], None] | None = None,
    start_step: int = 0,
) -> list[float]:
    """Train ``case.model`` with a plain loop and return the loss of every step.

    Each step: forward, loss, backward, ``on_loss(step, loss)`` and ``on_backward(step)`` (where
    a watcher reads the gradients), clipping if ``case.clip_grad_norm`` is set, ``optimizer.step()``,
    ``optimizer.zero_grad()``. This is the one training loop of the reference cases: the demo and
    the acceptance tests run it too, with a watcher stepped from ``on_loss``. Losses are kept on the device and copied to the host once, at the
    end. No randomness is consumed, so the same case and seed give the same losses.

    These models are tiny: on a shared CPU, ``torch.set_num_threads(1)`` is often several times
    faster than the default (small recurrent ops suffer most from oversubscribed threads).

    Args:
        case: the reference case; its model is trained in place.
        steps: number of steps. Default: ``case.default_steps``.
        optimizer: the optimizer to step (pass it to keep its state across calls, or to let a
            watcher hook it). Default: a new ``case.make_optimizer()``.
        on_backward: called with the step index after ``backward()``, before the update.
        on_loss: called with the step index and the step's loss (a scalar tensor) after
            ``backward()``, before ``on_backward`` (e.g. ``lambda step, loss: watcher.step(loss)``).
        start_step: index of the first step, so that a resumed run continues with the next
            batches. Default: ``0``.

    Returns:
        The per-step training losses.
    """
    steps = case.default_steps if steps is None else steps
    optimizer = case.make_optimizer() if optimizer is None else optimizer
    model = case.model
    model.train()
    losses: list[Tensor] = []
    for step in range(start_step, start_step + steps):
        inputs, targets = case.batch(step)
        loss = case.loss_fn(model(inputs), targets)
        loss.backward()
        if on_loss is not None:
            on_loss(step, loss)
        if on_backward is not None:
            on_backward(step)
        if case.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), case.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses).tolist() if losses else []


def final_loss(losses: Sequence[float], window: int = 10) -> float:
    """Smoothed final loss: the mean of the last ``window`` losses (``inf`` if any is non-finite).

    This is the number the acceptance criterion compares: a twin must reach at most half of its
    problem model's ``final_loss`` after the same number of steps.
    """
    if not losses:
        raise ValueError("final_loss() needs at least one loss")
    tail = list(losses)[-window:]
    if not all(math.isfinite(v) for v in tail):
        return math.inf
    return sum(tail) / len(tail)
