"""Vanishing gradients *through time* in a vanilla RNN, fixed by swapping it for a GRU (lstm_gru).

    python examples/vanilla_rnn.py [--fast] [--logdir runs/examples/vanilla_rnn]

The model is ``gradwatch.models``' ``vanilla_rnn``: a tanh ``nn.RNN`` (hidden 32) that must report the
sign written at t=0 of a 50-step noisy sequence. Going back one time step multiplies the gradient by
W_hh^T diag(1 - h^2), whose gain is below 1, so almost nothing of the loss reaches t=0 and the model
stays at chance (log 2 = 0.69).

Per-layer parameter gradients cannot show this (the recurrent weight's gradient is a sum over all time
steps). gradwatch measures it: on sampled steps it records the gradient with respect to the input at
every time step, and reports ``vanishing`` *through time* ("the gradient reaching the first time steps
is 1e-x of the one at the last steps") with the fix ``lstm_gru``: a gated cell whose state is carried
additively, its update gate biased to keep the state. This script also prints ||dL/dh_t|| per time
step, before and after, computed independently (``gradwatch.models.hidden_grad_norms_per_step``).
TensorBoard: ``tensorboard --logdir runs/examples/vanilla_rnn``.
"""

from __future__ import annotations

import argparse
import os

import torch

import gradwatch
from gradwatch import models

CASE = "vanilla_rnn"


def train(case: models.ReferenceCase, optimizer: torch.optim.Optimizer, steps: int, log_dir: str | None):
    """Plain PyTorch training loop with the three gradwatch lines; returns (watcher, diagnosis, final loss)."""
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
    return watcher, diagnosis, sum(losses[-10:]) / len(losses[-10:])


def through_time(case: models.ReferenceCase) -> str:
    """||dL/dh_t|| at a few time steps, relative to the last one."""
    norms = models.hidden_grad_norms_per_step(case)
    last = norms[-1].item()
    picks = [0, 10, 20, 30, 40, len(norms) - 1]
    return ", ".join(f"t={t}: {norms[t].item() / last:.1e}" for t in picks if t < len(norms))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="60 steps instead of the case's 200")
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "vanilla_rnn"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)                  # a small model: one thread is fastest

    case = models.create(CASE, seed=0)
    steps = 60 if args.fast else case.default_steps
    watcher, before, loss_before = train(case, case.make_optimizer(), steps, os.path.join(args.logdir, "before"))
    print(f"--- before: {steps} steps, final loss {loss_before:.3f}\n{before}")
    decay = watcher.to_dataframe().query("metric == 'time_decay_decades'")
    print("\ngradwatch's temporal measurement (decades of decay from the last to the first time step), per sampled step:")
    print(decay[["step", "layer", "value"]].to_string(index=False))
    print(f"||dL/dh_t|| / ||dL/dh_T|| of the trained RNN: {through_time(case)}")

    fixed = models.create(CASE, seed=0)       # the same initial weights and data
    optimizer = fixed.make_optimizer()        # the GRU's parameters join it, the RNN's leave it
    torch.manual_seed(0)
    report = gradwatch.apply_fixes(fixed.model, before, optimizer=optimizer, only=("lstm_gru",))
    print(f"\n--- apply_fixes(only=('lstm_gru',))\n{report}")

    _, after, loss_after = train(fixed, optimizer, steps, os.path.join(args.logdir, "after"))
    print(f"\n--- after: {steps} steps, final loss {loss_after:.3f}\n{after}")
    print(f"||dL/dh_t|| / ||dL/dh_T|| of the trained GRU: {through_time(fixed)}")
    print(f"\nloss {loss_before:.3f} -> {loss_after:.3f}; findings {sorted(before.kinds())} -> {sorted(after.kinds())}")
    print(f"tensorboard --logdir {args.logdir}")
    return {"before": before, "after": after, "report": report, "loss_before": loss_before, "loss_after": loss_after}


if __name__ == "__main__":
    main()
