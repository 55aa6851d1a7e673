"""Lightning quickstart: one callback watches a reference model's gradients and diagnoses them.

    python examples/lightning_quickstart.py [--model sigmoid_mlp] [--fast] [--logdir runs/lightning]

Any case of ``gradwatch.models`` (``--model``; ``python -c "import gradwatch.models as m;
print(m.list_models())"``) is wrapped in a small LightningModule. The callback reads per-layer
gradient statistics once per optimizer step (after accumulation and AMP unscaling, before
clipping), writes them through the Trainer's TensorBoardLogger (scalars, histograms, a
gradient-flow figure, the diagnosis as text) and prints the diagnosis at epoch ends when it
changes and at the end of fit. Then: ``tensorboard --logdir runs/lightning``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from gradwatch import models
from gradwatch.integrations.lightning import GradWatchCallback


class ReferenceModule(L.LightningModule):
    """A ``gradwatch.models`` reference case (model, task, loss, optimizer) as a LightningModule."""

    def __init__(self, case: models.ReferenceCase) -> None:
        super().__init__()
        self.case = case
        self.model = case.model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = self.case.loss_fn(self.model(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.case.make_optimizer(self.model.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.case.inputs, self.case.targets), batch_size=self.case.batch_size)


def main(argv: list[str] | None = None) -> GradWatchCallback:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sigmoid_mlp", choices=models.list_models(), help="reference case")
    parser.add_argument("--fast", action="store_true", help="a few seconds: 24 optimizer steps")
    parser.add_argument("--logdir", default="runs/lightning", help="TensorBoardLogger save_dir")
    parser.add_argument("--fail-on-nonfinite", action="store_true", help="stop training on NaN/Inf gradients")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    case = models.create(args.model)
    steps = 24 if args.fast else case.default_steps
    gradwatch_cb = GradWatchCallback(                      # the one line that matters
        fail_on=("nonfinite",) if args.fail_on_nonfinite else (),
        histogram_every_n_steps=10 if args.fast else 50,
        activation_every_n_steps=5 if args.fast else 25,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=TensorBoardLogger(args.logdir, name=args.model),
        callbacks=[gradwatch_cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    trainer.fit(ReferenceModule(case))

    diagnosis = gradwatch_cb.diagnosis                       # also printed at the end of fit
    df = gradwatch_cb.to_dataframe()                         # long format: step, layer, metric, value
    norms = df[(df.metric == "grad_norm") & (df.layer != "(total)")].groupby("layer", sort=False)["value"].median()
    print(f"\n{args.model}: median gradient norm per layer, input -> output\n{norms.to_string()}")
    print(f"\nexpected problem: {case.problem}; found: {sorted(diagnosis.kinds()) if diagnosis else []}; "
          f"logs in {trainer.logger.log_dir}")
    return gradwatch_cb


if __name__ == "__main__":
    main()
