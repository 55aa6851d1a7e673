"""Preflight: probe the gradient flow on one real batch before training, and fix the model up front.

    python examples/preflight.py [--fast] [--logdir runs/examples/preflight]

The model is ``gradwatch.models``' ``vanilla_rnn``: a tanh ``nn.RNN`` that must remember the first
token of a 50-step sequence, where gradients vanish through time. Structural fixes are easiest before
training starts: no optimizer state to migrate, nothing to roll back, no checkpoint to replay.

``gradwatch.preflight(model, batch, loss_fn)`` runs a few forward/backward passes on the batch
(no optimizer step), diagnoses them, restores everything the probes touched (gradients, BatchNorm
statistics, train/eval modes), and applies the fixes that change the model itself (swap_activation,
he_init, insert_batchnorm, residual, lstm_gru; clipping and learning-rate advice belong to training
time). Here it finds vanishing through time and swaps the RNN for a GRU. ``fix=False`` only
recommends (the report then holds copy-pasteable code). The optimizer is built after preflight, so
it sees the new parameters. The script then trains the preflighted model and an untouched one from
the same initial state, both watched. TensorBoard: ``tensorboard --logdir runs/examples/preflight``.
"""

from __future__ import annotations

import argparse
import os

import torch

import gradwatch
from gradwatch import models

CASE = "vanilla_rnn"


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
    parser.add_argument("--fast", action="store_true", help="60 training steps instead of the case's 200")
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "preflight"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)                  # a small model: one thread is fastest

    case = models.create(CASE, seed=0)
    steps = 60 if args.fast else case.default_steps
    torch.manual_seed(0)
    result = gradwatch.preflight(case.model, case.batch(0), case.loss_fn)   # probe, diagnose, fix
    print(f"--- preflight\n{result}")
    check = gradwatch.preflight(case.model, case.batch(0), case.loss_fn, fix=False)  # the fixed model, probed again
    print(f"\n--- preflight of the fixed model (fix=False: recommend only)\n{check.diagnosis}")

    optimizer = case.make_optimizer()         # built after preflight: it sees the GRU's parameters
    after, loss_after = train(case, optimizer, steps, os.path.join(args.logdir, "preflighted"))
    untouched = models.create(CASE, seed=0)
    before, loss_before = train(untouched, untouched.make_optimizer(), steps, os.path.join(args.logdir, "untouched"))
    print(f"\n--- training the preflighted model: final loss {loss_after:.3f}\n{after}")
    print(f"\n--- training the untouched model: final loss {loss_before:.3f}\n{before}")
    print(f"\nfinal loss after {steps} steps: untouched {loss_before:.3f}, preflighted {loss_after:.3f}")
    print(f"findings at preflight {sorted(result.diagnosis.kinds())} -> after preflight's fixes {sorted(check.diagnosis.kinds())}")
    print(f"tensorboard --logdir {args.logdir}")
    return {"before": result.diagnosis, "after": check.diagnosis, "report": result.report, "trained": after,
            "trained_untouched": before, "loss_before": loss_before, "loss_after": loss_after}


if __name__ == "__main__":
    main()
