"""Auto-fix: gradwatch applies its recommended fixes during training, verifies them, and keeps or rolls back.

    python examples/auto_fix.py [--fast] [--logdir runs/examples/auto_fix]

The model is ``gradwatch.models``' ``sigmoid_mlp`` (10 hidden sigmoid layers: vanishing gradients).
``gradwatch.watch(model, optimizer=opt, auto_fix=True)`` runs a probe-apply-verify cycle:

1. probe: watch the first ``auto_fix_probe_steps`` collected steps and diagnose them;
2. apply once: snapshot the model and the optimizer, apply the recommended fixes of the findings
   (here swap_activation + he_init), telling the optimizer about any new parameter;
3. verify: train ``auto_fix_verify_steps`` more steps and compare the loss and the gradient flow
   with the probe window; if either got worse, restore the snapshot (model and optimizer).

Clipping is handled separately (it engages on exploding or non-finite findings at any diagnosis).
The training loop is unchanged: one ``watch`` call. Every decision is in ``watcher.autofixer.events``
(and in TensorBoard's text tab, ``gradwatch/auto_fix``). The script also trains an unwatched twin
from the same initial state for comparison. TensorBoard: ``tensorboard --logdir runs/examples/auto_fix``.
"""

from __future__ import annotations

import argparse
import os

import torch

import gradwatch
from gradwatch import models

CASE = "sigmoid_mlp"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="90 steps (probe 30, verify 30) instead of 200 (probe 50, verify 50)")
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "auto_fix"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)                  # a tiny model: one thread is fastest
    steps, probe, verify = (90, 30, 30) if args.fast else (200, 50, 50)

    case = models.create(CASE, seed=0)
    model, optimizer = case.model, case.make_optimizer()
    torch.manual_seed(0)                      # the fixes draw new weights
    watcher = gradwatch.watch(model, optimizer=optimizer, log_dir=os.path.join(args.logdir, "auto_fix"),
                              auto_fix=True, auto_fix_probe_steps=probe, auto_fix_verify_steps=verify)
    losses, before = [], None
    for step in range(steps):
        inputs, targets = case.batch(step)
        loss = case.loss_fn(model(inputs), targets)
        loss.backward()
        watcher.step(loss)
        if step == probe - 1:                 # what the auto-fixer is about to see (for this printout only)
            before = watcher.diagnose()
        optimizer.step()                      # collection, and the auto-fixer, run in this step's pre-hook
        optimizer.zero_grad()
        losses.append(loss.item())
    after = watcher.diagnose()
    watcher.close()
    print(f"--- diagnosis of the probe window (steps 0-{probe - 2})\n{before}")
    print("\n--- auto-fix events")
    for event in watcher.autofixer.events:
        print(f"step {event.step}: {event.action} - {event.detail}")
        for key, value in event.evidence.items():
            print(f"    {key}: {value:.4g}" if isinstance(value, float) else f"    {key}: {value}")
    print(f"\n--- diagnosis at the end (steps {steps - 50}-{steps - 1})\n{after}")
    print(f"\nthe model now:\n{model}")

    untouched = models.create(CASE, seed=0)   # the same initial state, no gradwatch
    baseline = models.train(untouched, steps)
    loss_auto, loss_base = sum(losses[-10:]) / 10, models.final_loss(baseline)
    print(f"\nfinal loss after {steps} steps: with auto_fix {loss_auto:.3f}, untouched {loss_base:.3f}")
    print(f"findings {sorted(before.kinds())} -> {sorted(after.kinds())}")
    print(f"tensorboard --logdir {args.logdir}")
    return {"before": before, "after": after, "events": watcher.autofixer.events, "loss_before": loss_base,
            "loss_after": loss_auto}


if __name__ == "__main__":
    main()
