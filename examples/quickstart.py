"""Quickstart: watch a deep sigmoid MLP, see its gradients vanish, print the diagnosis.

    python examples/quickstart.py [--steps 60] [--logdir runs/quickstart]

Plain PyTorch: three lines added to an ordinary training loop.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch


def deep_sigmoid_mlp(depth: int = 12, width: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(20, width), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None) -> gradwatch.Diagnosis:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--logdir", default=None, help="write TensorBoard logs here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(1024, 20)
    y = (x[:, 0] * x[:, 1] > 0).long()
    model = deep_sigmoid_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    watcher = gradwatch.watch(model, log_dir=args.logdir)           # 1. watch
    for _ in range(args.steps):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        watcher.step(loss)                                          # 2. after backward
        optimizer.step()
        optimizer.zero_grad()
    diagnosis = watcher.diagnose()                                  # 3. diagnose
    watcher.close()
    print(diagnosis)
    return diagnosis


if __name__ == "__main__":
    main()
