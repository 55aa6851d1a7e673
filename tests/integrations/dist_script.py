"""Two-process Lightning run for the distributed tests:
``python dist_script.py {ddp,ddp_fail,fsdp2,tp,fsdp2_detach_before,fsdp2_detach_after} OUT_DIR``.

Run by ``test_lightning_distributed.py`` in a subprocess (Lightning's DDP launcher re-runs this
script for rank 1). Each rank writes what it recorded to ``OUT_DIR/rank{r}.csv`` and
``OUT_DIR/rank{r}.json`` (the float64 reference statistics from full tensors, the diagnosis).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from exit_probe import note_group_at_exit
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lit_models import TRAINER_DEFAULTS, LitMLP, LitShardedMLP, LitTensorParallelMLP

from gradwatch.findings import Diagnosis
from gradwatch.integrations.lightning import GradientHealthError, GradWatchCallback
from gradwatch.integrations.lightning_fail_on import FailOn


class _RankOneFailOn(FailOn):
    """Only rank 1 sees a failing finding (from its third collected step): every rank must stop."""

    def __init__(self, callback: GradWatchCallback) -> None:
        super().__init__(callback.fail_on, callback.diagnose)
        self.callback = callback

    def failing(self, diag: Diagnosis, unscale: object) -> list:
        rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning's launcher for the started ranks
        return ["rank-local finding"] if rank == 1 and self.callback._optimizer_steps >= 3 else []


class _FailsOnRankOne(GradWatchCallback):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._fail_on = _RankOneFailOn(self)


#: collective timeout of the sharded-detach runs: a rank left waiting in a reduction gives up after it
#: (the run then fails); far above any wait of a working run, even on a busy machine
DETACH_TIMEOUT_S = 120
#: the optimizer step at which rank 1's watcher fails in the sharded-detach runs
DETACH_AT = 3


class _WatcherFailsOnRankOne(GradWatchCallback):
    """gradwatch itself breaks on rank 1 at step ``DETACH_AT``: before the step's row reduction (computing
    the statistics raises) or after it (a step callback raises)."""

    def __init__(self, where: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.where = where

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.global_rank == 1 and self.watcher is not None and self.where == "after":
            def fail_after(w: object, step: int) -> None:
                if step >= DETACH_AT:
                    raise RuntimeError("rank-local gradwatch failure after the reduction")

            self.watcher.add_step_callback(fail_after)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: object) -> None:
        watcher = self.watcher
        if trainer.global_rank == 1 and watcher is not None and self.where == "before" and trainer.global_step >= DETACH_AT:
            def broken(slow: bool) -> list:  # (the watcher builds its collector at the first forward pass)
                raise RuntimeError("rank-local gradwatch failure before the reduction")

            watcher.collector.compute_on_device = broken
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    if mode == "ddp_fail":
        _fail_on_one_rank(out)
        return
    if mode.startswith("fsdp2_detach_"):
        _sharded_detach(mode.removeprefix("fsdp2_detach_"), out)
        return
    if mode == "ddp":
        model: LitMLP = LitMLP(record_reference=True, n=64, batch_size=8)
        strategy: object = "ddp"
    elif mode == "tp":
        model = LitTensorParallelMLP(record_reference=True, n=64, batch_size=8)
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    else:
        model = LitShardedMLP(record_reference=True, n=64, batch_size=8, width=15)  # odd sizes: uneven shards
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    loggers = [CSVLogger(str(out / "logs"), name="csv"), TensorBoardLogger(str(out / "logs"), name="tb")]
    callback = GradWatchCallback(activation_every_n_steps=2, log_every_n_steps=1, histogram_every_n_steps=2)
    trainer = L.Trainer(**{**TRAINER_DEFAULTS, "devices": 2, "strategy": strategy, "max_epochs": 2, "logger": loggers,
                           "callbacks": [callback], "enable_checkpointing": False, "log_every_n_steps": 1})
    trainer.fit(model)
    rank = trainer.global_rank
    callback.to_dataframe().to_csv(out / f"rank{rank}.csv", index=False)
    watcher = callback.watcher
    assert watcher is not None and callback.diagnosis is not None
    (out / f"rank{rank}.json").write_text(json.dumps({
        "reference": {str(k): v for k, v in model.reference.items()},
        "diagnosis": callback.diagnosis.to_dict(),
        "error": watcher.error,
        "world_size": trainer.world_size,
        "sinks": [type(s).__name__ for s in watcher.sinks],
    }))


def _fail_on_one_rank(out: Path) -> None:
    note_group_at_exit(out)
    callback = _FailsOnRankOne(fail_on=("dead_units",), diagnose_every_n_steps=1, verbose=False)
    trainer = L.Trainer(**{**TRAINER_DEFAULTS, "devices": 2, "strategy": "ddp", "max_epochs": 3, "logger": False,
                           "callbacks": [callback], "enable_checkpointing": False})
    try:
        trainer.fit(LitMLP())
        result = {"stopped_at": None, "message": ""}
    except GradientHealthError as exc:
        result = {"stopped_at": exc.step, "message": str(exc)}
    result["global_step"] = trainer.global_step
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def _sharded_detach(where: str, out: Path) -> None:
    # every_n_steps=2: after a failure past the reduction, the failed rank must take part at the next
    # *collected* step (4 -> 6), not at the next optimizer step
    callback = _WatcherFailsOnRankOne(where, every_n_steps=2, diagnose_every_n_steps=1, verbose=False)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     timeout=timedelta(seconds=DETACH_TIMEOUT_S))
    trainer = L.Trainer(**{**TRAINER_DEFAULTS, "devices": 2, "strategy": strategy, "max_epochs": 3, "logger": False,
                           "callbacks": [callback], "enable_checkpointing": False})
    start = time.monotonic()
    trainer.fit(LitShardedMLP(n=64, batch_size=8, width=15))
    watcher = callback.watcher
    assert watcher is not None
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "seconds": time.monotonic() - start, "global_step": trainer.global_step, "error": watcher.error,
        "collected": watcher.collected, "steps": [int(s) for s in watcher.history.view().steps],
    }))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
