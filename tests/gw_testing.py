"""Small real models, tasks and a plain training loop shared by the tests (``from gw_testing import ...``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch


def mlp(act: type[nn.Module], depth: int, width: int = 32, din: int = 16, dout: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(din, width), act()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, dout))
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """ResNet-style CNN with BatchNorm and Kaiming init: a healthy control."""

    def __init__(self, c: int = 8, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*[_Block(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 4)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(F.relu(self.bn(self.stem(x)))).mean((2, 3)))


class PreLNTransformer(nn.Module):
    """Pre-LayerNorm transformer encoder classifier: a healthy control."""

    def __init__(self, d: int = 32, layers: int = 3, vocab: int = 50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.emb(x))).mean(1))


def vector_task(seed: int = 0) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = (step * 32) % 256
        return x[i:i + 32], y[i:i + 32]

    return batch


def image_task(seed: int = 0) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = (step * 32) % 128
        return x[i:i + 32], y[i:i + 32]

    return batch


def token_task(seed: int = 0) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (128, 10), generator=g)
    y = x[:, 0] % 4

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = (step * 16) % 128
        return x[i:i + 16], y[i:i + 16]

    return batch


def train(
    model: nn.Module,
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    watcher: gradwatch.GradWatcher | None = None,
    opt: torch.optim.Optimizer | None = None,
    lr: float = 0.05,
    loss_scale: float = 1.0,
    before_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Plain loop: forward, loss, backward, watcher.step(), optimizer step."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y) * loss_scale
        loss.backward()
        if before_step is not None:
            before_step(step)
        if watcher is not None and watcher.optimizer is None:
            watcher.step(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def scale_init(model: nn.Module, factor: float) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=factor * math.sqrt(2.0 / m.in_features))
            nn.init.zeros_(m.bias)
    return model
