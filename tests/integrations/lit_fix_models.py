"""LightningModules for the auto-fix / preflight / resume tests (also imported by ``dist_autofix_script.py``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lit_models import LitMLP, dataset
from torch import nn
from torch.utils.data import DataLoader


class LitFixMLP(LitMLP):
    """``LitMLP`` with what the fixes interact with.

    Args:
        loss_scale: the loss is multiplied by it (1e4: exploding gradients, the cure is clipping).
        scheduler: ``None``, ``"lambda"`` (``LambdaLR``, 0.95 per step) or ``"step"`` (``StepLR``, 0.9 per
            step: chainable, so a stale learning rate would persist), stepped every optimizer step.
        momentum: SGD momentum (its buffers show which parameters the optimizer stepped).
        worse_with_batchnorm: multiply the loss by 10 once the model holds a BatchNorm (a harmful fix).
        **kwargs: ``LitMLP`` arguments.

    ``training_step`` logs the loss (``self.log`` outside the loop must not break preflight) and
    ``on_before_zero_grad`` records the global gradient norm the optimizer step used (after clipping).
    """

    def __init__(self, loss_scale: float = 1.0, scheduler: str | None = None, momentum: float = 0.0,
                 worse_with_batchnorm: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loss_scale, self.scheduler, self.momentum = loss_scale, scheduler, momentum
        self.worse_with_batchnorm = worse_with_batchnorm
        self.stepped_norms: dict[int, float] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx) * self.loss_scale
        if self.worse_with_batchnorm and any(isinstance(m, nn.BatchNorm1d) for m in self.modules()):
            loss = loss * 10
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_before_zero_grad(self, optimizer: Any) -> None:
        grads = [p.grad.detach().double().norm() for p in self.parameters() if p.grad is not None]
        if grads:
            self.stepped_norms[self.global_step - 1] = float(torch.stack(grads).norm())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.scheduler is None:
            return optimizer
        if self.scheduler == "lambda":
            scheduler: Any = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.95**step)
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LitNoLoader(L.LightningModule):
    """A sigmoid MLP without ``train_dataloader``: data comes from ``trainer.fit(model, loader)``."""

    def __init__(self, depth: int = 8, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(8 if i == 0 else width, 3 if i == depth - 1 else width))
            if i < depth - 1:
                layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": F.cross_entropy(self(x), y)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size)
