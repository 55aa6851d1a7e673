"""Saturated sigmoids from over-scaled weights: the cause (the init) is fixed, not just the symptom.

    python examples/saturated_sigmoid.py [--fast] [--logdir runs/examples/saturated_sigmoid]

The model is ``gradwatch.models``' ``saturated_sigmoid``: a sigmoid MLP with one hidden layer whose
weights are 30x the Xavier scale. Pre-activations have a standard deviation of ~25, so most sigmoid
outputs sit within 0.01 of 0 or 1, where the derivative is nearly zero: those units are stuck and the
hidden layer acts as a fixed random binary feature map. It is shallow on purpose, so this is
saturation, not vanishing across depth.

gradwatch measures, on sampled steps, the fraction of each sigmoid/tanh output in the flat region and
reports ``saturation`` on ``act1``. Its fixes are ranked by cause: the layer feeding the sigmoid is far
above the Xavier scale, so ``he_init`` (for a sigmoid-fed layer: Xavier init, zero biases) comes before
``swap_activation``. This script applies each of them with ``apply_fixes(..., only=...)`` to a model
rebuilt from the same seed: he_init, and ``swap_activation`` alone, which removes the flat region but
keeps the 30x weights (ReLU outputs of size ~25 per unit: the loss gets worse, not better).
TensorBoard: ``tensorboard --logdir runs/examples/saturated_sigmoid``.
"""

from __future__ import annotations

import argparse
import os

import torch

import gradwatch
from gradwatch import models

CASE = "saturated_sigmoid"


def train(case: models.ReferenceCase, optimizer: torch.optim.Optimizer, steps: int, log_dir: str | None):
    """Plain PyTorch training loop with the three gradwatch lines; returns (diagnosis, final loss)."""
    model = case.model
    watcher = gradwatch.watch(model, optimizer=optimizer, log_dir=log_dir)
    losses = []
    for step in range(steps):
        inputs, targets = case.batch(step)
        loss = case.loss_fn(model(inputs), targets)
        loss.backward()
        watcher.step(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    diagnosis = watcher.diagnose()
    watcher.close()
    return diagnosis, sum(losses[-10:]) / len(losses[-10:])


def fix_and_train(before: gradwatch.Diagnosis, steps: int, log_dir: str, only: tuple[str, ...] | None = None):
    fixed = models.create(CASE, seed=0)       # the same initial weights and data
    optimizer = fixed.make_optimizer()
    torch.manual_seed(0)
    report = gradwatch.apply_fixes(fixed.model, before, optimizer=optimizer, only=only)
    diagnosis, loss = train(fixed, optimizer, steps, log_dir)
    return report, diagnosis, loss


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="60 steps instead of the case's 150")
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "saturated_sigmoid"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)                  # a tiny model: one thread is fastest

    case = models.create(CASE, seed=0)
    steps = 60 if args.fast else case.default_steps
    before, loss_before = train(case, case.make_optimizer(), steps, os.path.join(args.logdir, "before"))
    print(f"--- before: {steps} steps, final loss {loss_before:.3f}\n{before}")

    report, after, loss_after = fix_and_train(before, steps, os.path.join(args.logdir, "after"), only=("he_init",))
    print(f"\n--- apply_fixes(only=('he_init',))\n{report}\n\n--- after: final loss {loss_after:.3f}\n{after}")

    swap_report, swapped, loss_swapped = fix_and_train(before, steps, os.path.join(args.logdir, "swap_only"),
                                                       only=("swap_activation",))
    print(f"\n--- apply_fixes(only=('swap_activation',))\n{swap_report}\n\n--- after: final loss {loss_swapped:.3f}\n{swapped}")

    print(f"\nfinal loss after {steps} steps: untouched {loss_before:.3f}, he_init {loss_after:.3f}, "
          f"swap_activation alone {loss_swapped:.3f}")
    print(f"findings {sorted(before.kinds())} -> he_init: {sorted(after.kinds())}, swap alone: {sorted(swapped.kinds())}")
    print(f"tensorboard --logdir {args.logdir}")
    return {"before": before, "after": after, "report": report, "loss_before": loss_before, "loss_after": loss_after,
            "after_swap": swapped, "loss_swap": loss_swapped}


if __name__ == "__main__":
    main()
