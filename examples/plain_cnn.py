"""Vanishing gradients in a plain deep CNN (no normalisation), fixed by inserting BatchNorm.

    python examples/plain_cnn.py [--fast] [--logdir runs/examples/plain_cnn]

The model is ``gradwatch.models``' ``plain_cnn``: 10 3x3 convolutions with sigmoids and no
normalisation, classifying the orientation of noisy 16x16 gratings. Every layer multiplies the
gradient by sigmoid' <= 0.25 and a weight of gain < 1: conv1's gradient is ~1e-10 of the head's and
the loss stays at chance (log 4 = 1.39).

gradwatch reports ``vanishing`` with a ranked list of fixes (the printout shows it). This example is
about normalisation, so it restricts ``apply_fixes`` to the normalisation and skip-connection fixes
(``only=("insert_batchnorm", "residual")``): the first of those that applies is used, here a
BatchNorm2d after the convolutions of the decaying chain. Its parameters join the optimizer
(``add_param_group``). ``gradwatch demo --model plain_cnn`` applies the top-ranked fix instead.
TensorBoard: ``tensorboard --logdir runs/examples/plain_cnn``.
"""

from __future__ import annotations

import argparse
import os

import torch

import gradwatch
from gradwatch import models

CASE = "plain_cnn"


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="60 steps instead of the case's 150")
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "plain_cnn"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)                  # a small model: one thread is fastest

    case = models.create(CASE, seed=0)
    steps = 60 if args.fast else case.default_steps
    before, loss_before = train(case, case.make_optimizer(), steps, os.path.join(args.logdir, "before"))
    print(f"--- before: {steps} steps, final loss {loss_before:.3f}\n{before}")

    fixed = models.create(CASE, seed=0)       # the same initial weights and data
    optimizer = fixed.make_optimizer()        # new BatchNorm parameters join it (add_param_group)
    report = gradwatch.apply_fixes(fixed.model, before, optimizer=optimizer, only=("insert_batchnorm", "residual"))
    print(f"\n--- apply_fixes(only=('insert_batchnorm', 'residual'))\n{report}")
    print(f"\nthe fixed model:\n{fixed.model}")

    after, loss_after = train(fixed, optimizer, steps, os.path.join(args.logdir, "after"))
    print(f"\n--- after: {steps} steps, final loss {loss_after:.3f}\n{after}")
    print(f"\nloss {loss_before:.3f} -> {loss_after:.3f}; findings {sorted(before.kinds())} -> {sorted(after.kinds())}")
    print(f"tensorboard --logdir {args.logdir}")
    return {"before": before, "after": after, "report": report, "loss_before": loss_before, "loss_after": loss_after}


if __name__ == "__main__":
    main()
