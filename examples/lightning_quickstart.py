"""Lightning quickstart: one callback watches a deep sigmoid MLP's gradients vanish.

    python examples/lightning_quickstart.py [--fast] [--logdir runs/lightning] [--fail-on-nonfinite]

The callback reads per-layer gradient statistics once per optimizer step (after accumulation and
AMP unscaling, before clipping), logs them through the Trainer's TensorBoardLogger (scalars,
histograms, a gradient-flow figure, the diagnosis as text) and prints the diagnosis at epoch ends
when it changes and at the end of fit. Then: ``tensorboard --logdir runs/lightning``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from gradwatch.integrations.lightning import GradWatchCallback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DeepSigmoidMLP(L.LightningModule):
    """A classic vanishing-gradient model: many sigmoid layers at default init, plain SGD."""

    def __init__(self, depth: int = 12, width: int = 64, lr: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(20, width), nn.Sigmoid()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), nn.Sigmoid()]
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> GradWatchCallback:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few seconds: fewer samples and epochs")
    parser.add_argument("--logdir", default="runs/lightning", help="TensorBoardLogger save_dir")
    parser.add_argument("--fail-on-nonfinite", action="store_true", help="stop training on NaN/Inf gradients")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    n, epochs = (512, 2) if args.fast else (4096, 5)
    x = torch.randn(n, 20)
    y = (x[:, 0] * x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)

    gradwatch_cb = GradWatchCallback(                      # the one line that matters
        fail_on=("nonfinite",) if args.fail_on_nonfinite else (),
        histogram_every_n_steps=20 if args.fast else 100,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        accumulate_grad_batches=2,                           # statistics once per optimizer step
        logger=TensorBoardLogger(args.logdir, name="deep_sigmoid"),
        callbacks=[gradwatch_cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    trainer.fit(DeepSigmoidMLP(), loader)

    diagnosis = gradwatch_cb.diagnosis                       # also printed at the end of fit
    df = gradwatch_cb.to_dataframe()                         # long format: step, layer, metric, value
    norms = df[(df.metric == "grad_norm") & (df.layer != "(total)")].groupby("layer", sort=False)["value"].median()
    print(f"\nmedian per-layer gradient norm (input -> output):\n{norms.to_string()}")
    print(f"\nfindings: {sorted(diagnosis.kinds()) if diagnosis else 'none'}; logs in {trainer.logger.log_dir}")
    return gradwatch_cb


if __name__ == "__main__":
    main()
