"""Two-process Lightning DDP runs (CPU, gloo) in which one rank fails: ``python ddp_raise_script.py MODE OUT_DIR``.

Run by ``test_concurrency.py`` in a subprocess (Lightning's launcher starts rank 1 by re-running this
script). Modes:

- ``raise0`` / ``raise1``: that global rank's ``training_step`` raises at step 3;
- ``detach1``: gradwatch itself fails on rank 1 only (its watcher detaches at the first step) while
  training goes on: gradwatch's own collectives (the ``fail_on`` decision) must stay matched.

The strategy's collective timeout is short (``TIMEOUT_S``), so a rank left waiting for a dead peer
gives up instead of hanging. ``GradWatchCallback(fail_on=...)`` takes part in a collective on every
checked step and at every epoch end, the worst case for a hang. Each rank writes
``OUT_DIR/rank{r}.json`` when ``fit`` ends.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from hw_lit import TRAINER_DEFAULTS, LitNet
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from gradwatch.integrations.lightning import GradWatchCallback

TIMEOUT_S = 60
FAIL_AT = 3


class _DetachesOnRankOne(GradWatchCallback):
    """gradwatch breaks on rank 1 only: its statistics raise, so that watcher detaches at its first step."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: object) -> None:
        if trainer.global_rank == 1 and self.watcher is not None:
            def broken(slow: bool) -> list:
                raise RuntimeError("rank-local gradwatch failure")

            self.watcher.collector.compute_on_device = broken
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


class _TrainingClock(L.Callback):
    """When training started on this rank: after rank 1 was started and the process group formed, whose
    time (interpreter start-up, tens of seconds on a busy machine) says nothing about a hang."""

    def __init__(self) -> None:
        self.start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.monotonic()


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    if mode == "detach1":
        model = LitNet()
        callback: GradWatchCallback = _DetachesOnRankOne(fail_on=("dead_units", "nonfinite"), diagnose_every_n_steps=2,
                                                         verbose=False)
    else:
        model = LitNet(fail_at=FAIL_AT, fail_rank={"raise0": 0, "raise1": 1}[mode])
        callback = GradWatchCallback(fail_on=("nonfinite",), histogram_every_n_steps=1, activation_every_n_steps=1,
                                     verbose=False)
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=TIMEOUT_S))
    clock = _TrainingClock()
    trainer = L.Trainer(**{**TRAINER_DEFAULTS, "devices": 2, "strategy": strategy, "max_epochs": 3, "callbacks": [callback, clock],
                           "logger": TensorBoardLogger(str(out / "logs"), name="tb", version=0)})
    start = time.monotonic()
    result: dict = {}
    try:
        trainer.fit(model)
        result["error"] = None
    except BaseException as exc:  # noqa: BLE001 - record whatever ended fit, then re-raise
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        raise
    finally:
        watcher = callback.watcher
        result.update(
            seconds=time.monotonic() - (clock.start if clock.start is not None else start),
            global_step=trainer.global_step,
            watcher_closed=None if watcher is None else watcher.closed,
            watcher_error=None if watcher is None else watcher.error,
            collected=None if watcher is None else watcher.collected,
        )
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
