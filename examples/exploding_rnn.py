"""Exploding gradients in an RNN with over-scaled recurrent weights, fixed by gradient clipping.

    python examples/exploding_rnn.py [--fast] [--logdir runs/examples/exploding_rnn]

The model is ``gradwatch.models``' ``exploding_rnn``: a tanh ``nn.RNN`` whose recurrent weights have a
spectral radius of ~2.5, trained with SGD (lr 0.1) to name the token one step before the last of a
50-step sequence. The dynamics are chaotic and the gradient grows at every step back in time: at the
first step the recurrent layer's gradient is over a thousand times its weights' norm, so the very
first SGD update throws the weights so far that the tanh units saturate for good. From then on the
layer passes no gradient at all and the loss stays near chance (log 4 = 1.39).

gradwatch keeps each layer's run-long peak gradient-to-weight ratio, so the explosion stays visible
after it has left the diagnosis window: it reports ``exploding`` (the peak, its step, and that the
layer has been silent since) and, for a recurrence trained with SGD, recommends ``clip_gradients``
first: an optimizer step pre-hook capping the global gradient norm (1.0 by default), so every update
stays bounded. TensorBoard: ``tensorboard --logdir runs/examples/exploding_rnn``.
"""

from __future__ import annotations

import argparse
import os

import torch

import gradwatch
from gradwatch import models

CASE = "exploding_rnn"


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
        optimizer.step()                      # a clipper installed by apply_fixes runs first (pre-hook)
        optimizer.zero_grad()
        losses.append(loss.item())
    diagnosis = watcher.diagnose()
    watcher.close()
    return diagnosis, sum(losses[-10:]) / len(losses[-10:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="60 steps instead of the case's 200")
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "exploding_rnn"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)                  # a small model: one thread is fastest

    case = models.create(CASE, seed=0)
    steps = 60 if args.fast else case.default_steps
    before, loss_before = train(case, case.make_optimizer(), steps, os.path.join(args.logdir, "before"))
    print(f"--- before: {steps} steps, final loss {loss_before:.3f}\n{before}")

    fixed = models.create(CASE, seed=0)       # the same initial weights and data
    optimizer = fixed.make_optimizer()        # the clipper hooks into this optimizer
    report = gradwatch.apply_fixes(fixed.model, before, optimizer=optimizer, only=("clip_gradients",))
    print(f"\n--- apply_fixes(only=('clip_gradients',))\n{report}")

    after, loss_after = train(fixed, optimizer, steps, os.path.join(args.logdir, "after"))
    print(f"\n--- after: {steps} steps, final loss {loss_after:.3f}\n{after}")
    for clipper in report.clippers:
        clipper.remove()
    print(f"\nloss {loss_before:.3f} -> {loss_after:.3f}; findings {sorted(before.kinds())} -> {sorted(after.kinds())}")
    print(f"tensorboard --logdir {args.logdir}")
    return {"before": before, "after": after, "report": report, "loss_before": loss_before, "loss_after": loss_after}


if __name__ == "__main__":
    main()
