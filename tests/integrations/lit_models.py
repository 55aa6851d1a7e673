"""Small LightningModules for the integration tests (also imported by the multi-process scripts)."""

from __future__ import annotations

import math
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
}


def dataset(n: int = 64, din: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, din, generator=g)
    return TensorDataset(x, (x @ torch.randn(din, classes, generator=g)).argmax(dim=1))


class LitMLP(L.LightningModule):
    """A small MLP classifier.

    Args:
        act: activation class between the linear layers.
        depth: number of Linear layers.
        call_root: ``training_step`` calls ``self(x)`` (else ``self.net(x)``: the root forward never runs).
        nan_at_batch: from this batch index on the loss is multiplied by NaN.
        record_reference: keep float64 per-layer gradient norms computed in ``on_before_optimizer_step``.
    """

    def __init__(self, act: type[nn.Module] = nn.ReLU, depth: int = 3, width: int = 16, din: int = 8,
                 classes: int = 3, lr: float = 0.1, call_root: bool = True, nan_at_batch: int | None = None,
                 batch_size: int = 8, n: int = 64, record_reference: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(din if i == 0 else width, classes if i == depth - 1 else width))
            if i < depth - 1:
                layers.append(act())
        self.net = nn.Sequential(*layers)
        self.lr, self.call_root, self.nan_at_batch = lr, call_root, nan_at_batch
        self.batch_size, self.n = batch_size, n
        self.record_reference = record_reference
        self.reference: dict[int, dict[str, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x) if self.call_root else self.net(x)
        loss = F.cross_entropy(out, y)
        if self.nan_at_batch is not None and batch_idx >= self.nan_at_batch:
            loss = loss * math.nan
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.record_reference:
            self.reference[self.global_step] = layer_stats(self)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(self.n), batch_size=self.batch_size)


def layer_stats(module: nn.Module) -> dict[str, dict[str, float]]:
    """Brute-force float64 statistics per layer from full tensors (gathered first if sharded).

    ``{layer: {"grad_norm", "grad_mean_abs", "grad_max_abs", "weight_norm"}}``; a collective for
    sharded parameters, so every rank must call it.
    """
    out: dict[str, dict[str, float]] = {}
    for name, sub in module.named_modules():
        sq = l1 = mx = wsq = 0.0
        numel = 0
        for p in sub.parameters(recurse=False):
            if p.grad is None:
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            w = p.full_tensor() if hasattr(p, "full_tensor") else p
            g, w = g.detach().double(), w.detach().double()
            sq += float(g.square().sum())
            l1 += float(g.abs().sum())
            mx = max(mx, float(g.abs().max()))
            wsq += float(w.square().sum())
            numel += g.numel()
        if numel:
            out[name.replace("._orig_mod", "")] = {
                "grad_norm": math.sqrt(sq), "grad_mean_abs": l1 / numel, "grad_max_abs": mx, "weight_norm": math.sqrt(wsq),
            }
    return out


class LitShardedMLP(LitMLP):
    """``LitMLP`` sharded with FSDP2 (``fully_shard``) over the data-parallel mesh of ``ModelParallelStrategy``."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class LitTensorParallelMLP(LitMLP):
    """``LitMLP`` with its first two Linear layers column-parallel (weights and biases sharded over the
    tensor-parallel mesh, outputs replicated) and the last one a plain, replicated layer."""

    def configure_model(self) -> None:
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = self.device_mesh["tensor_parallel"]
        plan = {"net.0": ColwiseParallel(output_layouts=Replicate()), "net.2": ColwiseParallel(output_layouts=Replicate())}
        parallelize_module(self, mesh, plan)


class LitTwoOptimizers(L.LightningModule):
    """Manual optimization with two optimizers stepping one after the other in each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.second = nn.Sequential(nn.Linear(8, 3))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()
        self.toggle_optimizer(opt_a)
        loss_a = F.cross_entropy(self.second(self.first(x)), y)
        self.manual_backward(loss_a)
        opt_a.step()
        opt_a.zero_grad()
        self.untoggle_optimizer(opt_a)
        self.toggle_optimizer(opt_b)
        loss_b = F.cross_entropy(self.second(self.first(x).detach()), y)
        self.manual_backward(loss_b)
        opt_b.step()
        opt_b.zero_grad()
        self.untoggle_optimizer(opt_b)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.first.parameters(), lr=0.1), torch.optim.Adam(self.second.parameters(), lr=1e-3)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(32), batch_size=8)
