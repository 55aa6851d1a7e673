"""Dead ReLU units, fixed by he_init (or, more slowly, by LeakyReLU).

    python examples/dead_relu.py [--fast] [--logdir runs/examples/dead_relu]

The model is ``gradwatch.models``' ``dead_relu_mlp``: a 3-hidden-layer ReLU MLP whose first layer's
biases are -4, as one too-large learning-rate step can leave them. ~85% of fc1's units are negative
for every example: they output 0, receive no gradient and cannot recover, so the network starves
and the loss stays near chance (log 4 = 1.39).

gradwatch measures, on sampled steps, the fraction of each ReLU's units that are inactive for every
input of the batch, reports ``dead_units`` on ``act1`` and recommends ``he_init`` of the layer feeding
it (Kaiming weights, zero biases) and ``swap_activation`` (LeakyReLU, which keeps a small gradient
alive). This script applies each of them with ``apply_fixes(..., only=...)`` to a model rebuilt from
the same seed, and retrains both for the same number of steps.
TensorBoard: ``tensorboard --logdir runs/examples/dead_relu``.
"""

from __future__ import annotations

import argparse
import os

import torch

import gradwatch
from gradwatch import models

CASE = "dead_relu_mlp"


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
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "dead_relu"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)                  # a tiny model: one thread is fastest

    case = models.create(CASE, seed=0)
    steps = 60 if args.fast else case.default_steps
    before, loss_before = train(case, case.make_optimizer(), steps, os.path.join(args.logdir, "before"))
    print(f"--- before: {steps} steps, final loss {loss_before:.3f}\n{before}")

    report, after, loss_after = fix_and_train(before, steps, os.path.join(args.logdir, "after"), only=("he_init",))
    print(f"\n--- apply_fixes(only=('he_init',))\n{report}\n\n--- after: final loss {loss_after:.3f}\n{after}")

    leaky_report, leaky, loss_leaky = fix_and_train(before, steps, os.path.join(args.logdir, "leaky_relu"),
                                                    only=("swap_activation",))
    print(f"\n--- apply_fixes(only=('swap_activation',))\n{leaky_report}\n\n--- after: final loss {loss_leaky:.3f}\n{leaky}")

    print(f"\nfinal loss after {steps} steps: untouched {loss_before:.3f}, he_init {loss_after:.3f}, "
          f"LeakyReLU {loss_leaky:.3f} (a 0.01 slope under a -4 bias recovers slowly)")
    print(f"findings {sorted(before.kinds())} -> he_init: {sorted(after.kinds())}, LeakyReLU: {sorted(leaky.kinds())}")
    print(f"tensorboard --logdir {args.logdir}")
    return {"before": before, "after": after, "report": report, "loss_before": loss_before, "loss_after": loss_after,
            "after_leaky": leaky, "loss_leaky": loss_leaky}


if __name__ == "__main__":
    main()
