"""A small LightningModule for the hardening tests (imported by the tests and by ``ddp_raise_script.py``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu",
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "enable_checkpointing": False,
}


def dataset(n: int = 96, din: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, din, generator=g)
    return TensorDataset(x, (x @ torch.randn(din, classes, generator=g)).argmax(dim=1))


class LitNet(L.LightningModule):
    """Linear, BatchNorm (buffers), ReLU, Dropout (consumes the global RNG), Linear; Adam; shuffled data.

    Args:
        fail_at: raise ``RuntimeError`` (or ``interrupt=True``: ``KeyboardInterrupt``) in ``training_step``
            at this global step.
        fail_rank: only this global rank fails (``None``: every rank).
    """

    def __init__(self, fail_at: int | None = None, interrupt: bool = False, fail_rank: int | None = None,
                 n: int = 96, batch_size: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16),
                                 nn.Tanh(), nn.Linear(16, 3))
        self.fail_at, self.interrupt, self.fail_rank = fail_at, interrupt, fail_rank
        self.n, self.batch_size = n, batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step == self.fail_at and (
                self.fail_rank is None or self.global_rank == self.fail_rank):
            if self.interrupt:
                raise KeyboardInterrupt
            raise RuntimeError(f"training_step failed on rank {self.global_rank} at step {self.global_step}")
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2, weight_decay=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(self.n), batch_size=self.batch_size, shuffle=True)
