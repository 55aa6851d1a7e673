"""Vanishing gradients in a deep tanh MLP with a tiny initialisation, fixed by he_init (Xavier for tanh).

    python examples/tanh_tiny_init.py [--fast] [--logdir runs/examples/tanh_tiny_init]

The model is ``gradwatch.models``' ``tanh_tiny_init``: 10 hidden Linear+Tanh layers whose weights start
at std 0.02. Around zero tanh is linear, so each layer scales the forward signal and the backward
gradient by ~0.02 * sqrt(32) ~ 0.1: the input is lost after a few layers and the early layers'
gradients are ~1e-8 of the late ones'. The activation is not the problem here (nothing saturates); the
weights are.

gradwatch reports ``vanishing`` with the cause "weights far below He/Xavier scale" and recommends
``he_init`` first: for tanh-fed layers that is Xavier init with gain 5/3, which keeps the signal's
variance through each layer. The activation is kept. The example applies that fix
(``only=("he_init",)``) to a model rebuilt from the same seed and retrains it. TensorBoard:
``tensorboard --logdir runs/examples/tanh_tiny_init``.
"""

from __future__ import annotations

import argparse
import os

import torch

import gradwatch
from gradwatch import models

CASE = "tanh_tiny_init"


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


def weight_stds(model: torch.nn.Module) -> str:
    return ", ".join(f"{name}={m.weight.std().item():.3f}" for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="60 steps instead of the case's 150 (seconds)")
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "tanh_tiny_init"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)                  # a tiny model: one thread is fastest

    case = models.create(CASE, seed=0)
    steps = 60 if args.fast else case.default_steps
    print(f"weight std before training: {weight_stds(case.model)}")
    before, loss_before = train(case, case.make_optimizer(), steps, os.path.join(args.logdir, "before"))
    print(f"\n--- before: {steps} steps, final loss {loss_before:.3f}\n{before}")

    fixed = models.create(CASE, seed=0)       # the same initial weights and data
    optimizer = fixed.make_optimizer()
    torch.manual_seed(0)
    report = gradwatch.apply_fixes(fixed.model, before, optimizer=optimizer, only=("he_init",))
    print(f"\n--- apply_fixes(only=('he_init',))\n{report}")
    print(f"weight std after the fixes: {weight_stds(fixed.model)}")

    after, loss_after = train(fixed, optimizer, steps, os.path.join(args.logdir, "after"))
    print(f"\n--- after: {steps} steps, final loss {loss_after:.3f}\n{after}")
    print(f"\nloss {loss_before:.3f} -> {loss_after:.3f}; findings {sorted(before.kinds())} -> {sorted(after.kinds())}")
    print(f"tensorboard --logdir {args.logdir}")
    return {"before": before, "after": after, "report": report, "loss_before": loss_before, "loss_after": loss_after}


if __name__ == "__main__":
    main()
