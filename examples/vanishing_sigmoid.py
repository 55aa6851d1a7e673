"""Vanishing gradients in a deep sigmoid MLP, fixed by swap_activation + he_init.

    python examples/vanishing_sigmoid.py [--fast] [--logdir runs/examples/vanishing_sigmoid]

The model is ``gradwatch.models``' ``sigmoid_mlp``: 10 hidden Linear+Sigmoid layers with PyTorch's
default initialisation, trained with SGD on a linearly separable synthetic task. Backpropagation
multiplies the gradient by sigmoid'(z) <= 0.25 and a weight matrix of gain < 1 at every layer, so the
first layer's gradient is ~1e-8 of the head's and the loss stays at chance (log 4 = 1.39).

gradwatch reports ``vanishing`` with a ranked list of fixes (the printout shows it). This example
demonstrates one of them, ``swap_activation`` (Sigmoid -> ReLU), which ``apply_fixes`` follows with
``he_init`` (Kaiming weights for the new ReLU stack): ``only=("swap_activation", "he_init")``
restricts the policy to those two. The script trains the model watched, prints the diagnosis,
rebuilds the model from the same seed, applies the fixes, retrains for the same number of steps and
prints the diagnosis again. ``gradwatch demo --model sigmoid_mlp`` applies the top-ranked fix instead.
TensorBoard: ``tensorboard --logdir runs/examples/vanishing_sigmoid``.
"""

from __future__ import annotations

import argparse
import os

import torch

import gradwatch
from gradwatch import models

CASE = "sigmoid_mlp"


def train(case: models.ReferenceCase, optimizer: torch.optim.Optimizer, steps: int, log_dir: str | None):
    """Plain PyTorch training loop with the three gradwatch lines; returns (diagnosis, final loss)."""
    model = case.model
    watcher = gradwatch.watch(model, optimizer=optimizer, log_dir=log_dir)  # 1. watch
    losses = []
    for step in range(steps):
        inputs, targets = case.batch(step)
        loss = case.loss_fn(model(inputs), targets)
        loss.backward()
        watcher.step(loss)                    # 2. after backward (collected right before optimizer.step())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    diagnosis = watcher.diagnose()            # 3. diagnose
    watcher.close()
    return diagnosis, sum(losses[-10:]) / len(losses[-10:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="60 steps instead of the case's 150 (seconds)")
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "vanishing_sigmoid"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)                  # a tiny model: one thread is fastest (and fair on shared machines)

    case = models.create(CASE, seed=0)
    steps = 60 if args.fast else case.default_steps
    print(case.model)
    before, loss_before = train(case, case.make_optimizer(), steps, os.path.join(args.logdir, "before"))
    print(f"\n--- before: {steps} steps, final loss {loss_before:.3f}\n{before}")

    fixed = models.create(CASE, seed=0)       # the same initial weights and data
    optimizer = fixed.make_optimizer()
    torch.manual_seed(0)                      # he_init draws new weights
    report = gradwatch.apply_fixes(fixed.model, before, optimizer=optimizer, only=("swap_activation", "he_init"))
    print(f"\n--- apply_fixes(only=('swap_activation', 'he_init'))\n{report}")

    after, loss_after = train(fixed, optimizer, steps, os.path.join(args.logdir, "after"))
    print(f"\n--- after: {steps} steps, final loss {loss_after:.3f}\n{after}")
    print(f"\nloss {loss_before:.3f} -> {loss_after:.3f}; findings {sorted(before.kinds())} -> {sorted(after.kinds())}")
    print(f"tensorboard --logdir {args.logdir}")
    return {"before": before, "after": after, "report": report, "loss_before": loss_before, "loss_after": loss_after}


if __name__ == "__main__":
    main()
