"""Two-process DDP runs for the auto-fix tests: ``python dist_autofix_script.py {autofix,preflight} OUT_DIR``.

Run by ``test_lightning_autofix.py`` in a subprocess (Lightning's launcher re-runs this script for
rank 1). Each rank makes its random state differ from the other's on purpose (a re-initialisation
drawn on each rank would differ), and writes ``OUT_DIR/rank{r}.pt`` (its final ``state_dict``) and
``OUT_DIR/rank{r}.json`` (events, clipping, what it held before and after gradwatch's broadcasts).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lit_fix_models import LitFixMLP
from lit_models import TRAINER_DEFAULTS
from torch import nn

from gradwatch.integrations import lightning_distributed
from gradwatch.integrations.lightning import GradWatchCallback

RANK = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning's launcher for the started rank


class _RankSeeded(LitFixMLP):
    """From the first training batch on, each rank draws different random numbers."""

    def on_train_start(self) -> None:
        torch.manual_seed(1000 + self.global_rank)


def _checksum(module: nn.Module, prefixes: set[str]) -> float:
    """Sum of |values| of the floating-point tensors under ``prefixes`` (what gradwatch broadcasts)."""
    return float(sum(v.detach().double().abs().sum() for k, v in module.state_dict().items()
                     if v.is_floating_point() and any(k.startswith(p + ".") for p in prefixes)))


def _record_broadcasts(log: list[dict[str, float]]) -> None:
    original = lightning_distributed.broadcast_modules

    def recording(trainer: Any, module: nn.Module, prefixes: Any) -> int:
        prefixes = set(prefixes)
        before = _checksum(module, prefixes)
        copied = original(trainer, module, prefixes)
        log.append({"before": before, "after": _checksum(module, prefixes), "copied": copied})
        return copied

    lightning_distributed.broadcast_modules = recording


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    broadcasts: list[dict[str, float]] = []
    _record_broadcasts(broadcasts)
    if mode == "autofix":
        L.seed_everything(0, verbose=False)
        # vanishing (he_init applies; insert_batchnorm would, but is structural: refused under DDP) and
        # exploding (the loss is scaled: clipping engages)
        model: LitFixMLP = _RankSeeded(act=nn.Sigmoid, depth=8, loss_scale=1e4, lr=1e-6)
        callback = GradWatchCallback(auto_fix=("insert_batchnorm", "he_init", "clip_gradients"), auto_fix_probe_steps=5,
                                     auto_fix_verify_steps=3, diagnose_every_n_steps=5, verbose=False)
        max_epochs = 3  # 64 samples / 2 ranks / batch 8 = 4 steps per epoch
    else:
        torch.manual_seed(100 + RANK)  # a different initialisation on each rank: preflight must not depend on it
        model = LitFixMLP(act=nn.Sigmoid, depth=8)
        callback = GradWatchCallback(preflight=True, verbose=False)
        max_epochs = 1
    trainer = L.Trainer(**{**TRAINER_DEFAULTS, "devices": 2, "strategy": "ddp", "max_epochs": max_epochs, "logger": False,
                           "callbacks": [callback], "enable_checkpointing": False})
    trainer.fit(model)
    rank = trainer.global_rank
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    result = callback.preflight_result
    (out / f"rank{rank}.json").write_text(json.dumps({
        "events": [[e.step, e.action, e.detail] for e in callback.auto_fix_events],
        "gradient_clip_val": trainer.gradient_clip_val,
        "broadcasts": broadcasts,
        "preflight": [c.summary() for c in result.report.applied] if result is not None else None,
        "records": [r["source"] for r in callback.fix_records],
        "world_size": trainer.world_size,
        "error": callback.watcher.error if callback.watcher is not None else "no watcher",
    }))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
