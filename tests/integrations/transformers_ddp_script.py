"""One rank of the 2-process DDP run of ``test_transformers.py`` (started by ``torchrun``, gloo on CPU).

Each rank trains the same tiny GPT-2 with ``GradWatchTrainerCallback`` and writes what it recorded to
``<out>/rank<k>.json``; rank zero also writes TensorBoard files under ``<out>/tb``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

from gradwatch.integrations.transformers import GradWatchTrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exit_probe import note_group_at_exit  # noqa: E402
from test_transformers import gpt2, tokens  # noqa: E402


def main(out: Path) -> None:
    note_group_at_exit(out)
    torch.manual_seed(0)
    callback = GradWatchTrainerCallback(log_dir=str(out / "tb"))
    args = transformers.TrainingArguments(
        str(out / "hf"), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_grad_norm=1e-3, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
        seed=0, ddp_backend="gloo")
    trainer = transformers.Trainer(model=gpt2(), args=args, train_dataset=tokens(), callbacks=[callback])
    trainer.train()
    df = callback.to_dataframe()
    rows = df[df.metric.isin(["grad_norm", "weight_norm"])]
    result = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "values": {f"{m}|{layer}|{step}": float(v) for m, layer, step, v in zip(rows.metric, rows.layer, rows.step, rows.value, strict=True)},
        "hf_grad_norm": {int(e["step"]): float(e["grad_norm"]) for e in trainer.state.log_history if "grad_norm" in e},
        "clipped_steps": callback.clipped_steps,
        "collected": callback.watcher.collected if callback.watcher is not None else 0,
    }
    (out / f"rank{trainer.args.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
