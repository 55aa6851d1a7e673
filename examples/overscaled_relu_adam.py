"""Exploding gradients from an over-scaled initialisation under Adam: he_init cures it, clipping cannot.

    python examples/overscaled_relu_adam.py [--fast] [--logdir runs/examples/overscaled_relu_adam]

The model is ``gradwatch.models``' ``overscaled_relu_mlp``: 8 hidden ReLU layers whose weights are 3x
the He scale, trained with Adam. ReLU is positively homogeneous, so the forward signal grows 3x per
layer and so does the gradient going back; every weight gradient is huge relative to its weights,
but roughly flat across depth (a growth-across-depth rule alone misses it). The loss is in the tens.

gradwatch reports ``exploding``, names the cause (weights several times the He scale) and, because the
optimizer is Adam, does not recommend clipping: Adam divides each gradient by its own running scale,
so its updates have the same size whatever the gradient's, and capping the gradient changes nothing.
Its fix is ``he_init``: re-initialise the over-scaled layers at He scale (the optimizer state of the
re-initialised parameters is reset).

This script trains three runs from the same initial state: untouched, fixed with ``apply_fixes``, and
with ``torch.nn.utils.clip_grad_norm_(..., 1.0)`` added to the loop instead, to show that clipping does
not help here. TensorBoard: ``tensorboard --logdir runs/examples/overscaled_relu_adam``.
"""

from __future__ import annotations

import argparse
import os

import torch

import gradwatch
from gradwatch import models

CASE = "overscaled_relu_mlp"


def train(case: models.ReferenceCase, optimizer: torch.optim.Optimizer, steps: int, log_dir: str | None,
          clip: float | None = None):
    """Plain PyTorch training loop with the three gradwatch lines; returns (diagnosis, final loss)."""
    model = case.model
    watcher = gradwatch.watch(model, optimizer=optimizer, log_dir=log_dir)
    losses = []
    for step in range(steps):
        inputs, targets = case.batch(step)
        loss = case.loss_fn(model(inputs), targets)
        loss.backward()
        watcher.step(loss)                    # (collected in optimizer.step(): after this clipping)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    diagnosis = watcher.diagnose()
    watcher.close()
    return diagnosis, sum(losses[-10:]) / len(losses[-10:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="60 steps instead of the case's 150")
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "overscaled_relu_adam"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)                  # a tiny model: one thread is fastest

    case = models.create(CASE, seed=0)
    steps = 60 if args.fast else case.default_steps
    before, loss_before = train(case, case.make_optimizer(), steps, os.path.join(args.logdir, "before"))
    print(f"--- before: {steps} steps, final loss {loss_before:.3f}\n{before}")

    fixed = models.create(CASE, seed=0)       # the same initial weights and data
    optimizer = fixed.make_optimizer()
    torch.manual_seed(0)
    report = gradwatch.apply_fixes(fixed.model, before, optimizer=optimizer, only=("he_init",))
    print(f"\n--- apply_fixes(only=('he_init',))\n{report}")
    after, loss_after = train(fixed, optimizer, steps, os.path.join(args.logdir, "after"))
    print(f"\n--- after: {steps} steps, final loss {loss_after:.3f}\n{after}")

    clipped = models.create(CASE, seed=0)     # the alternative that does not work under Adam
    _, loss_clipped = train(clipped, clipped.make_optimizer(), steps, os.path.join(args.logdir, "clipped"), clip=1.0)

    print(f"\nfinal loss after {steps} steps: untouched {loss_before:.3f}, he_init (gradwatch's fix) {loss_after:.3f}, "
          f"clipping at norm 1.0 instead {loss_clipped:.3f}")
    print(f"findings {sorted(before.kinds())} -> {sorted(after.kinds())}")
    print(f"tensorboard --logdir {args.logdir}")
    return {"before": before, "after": after, "report": report, "loss_before": loss_before, "loss_after": loss_after,
            "loss_clipped": loss_clipped}


if __name__ == "__main__":
    main()
