"""Hugging Face Trainer: one callback watches a tiny GPT-2's gradients while it learns synthetic tokens.

    python examples/hf_trainer.py [--fast] [--output-dir runs/hf_trainer] [--nan-at-step N]

The model is built from a small ``GPT2Config`` (no download) and trained on synthetic token
sequences (each token is the previous one plus a per-sequence stride, so there is something to
learn) with ``report_to="tensorboard"``. ``GradWatchTrainerCallback`` collects per-layer gradient
statistics once per optimizer step, before the Trainer's clipping, writes them into the same
TensorBoard run as HF's own curves, logs the diagnosis (one line when healthy) and, with
``--nan-at-step``, shows ``fail_on=("nonfinite",)`` stopping a run whose loss curve looks clean.
Then: ``tensorboard --logdir runs/hf_trainer/runs``. Runs in well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradwatch.integrations.transformers import GradWatchTrainerCallback

VOCAB, SEQ = 64, 16


def synthetic_tokens(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (start + torch.arange(SEQ) * torch.randint(1, 4, (n, 1), generator=g)) % VOCAB
    return [{"input_ids": x, "labels": x} for x in ids]


def main(argv: list[str] | None = None) -> GradWatchTrainerCallback:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few seconds: 20 optimizer steps")
    parser.add_argument("--output-dir", default="runs/hf_trainer", help="Trainer output_dir (TensorBoard in runs/)")
    parser.add_argument("--nan-at-step", type=int, default=0, help="make one layer's gradient NaN at this step")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=SEQ, vocab_size=VOCAB,
                                       bos_token_id=0, eos_token_id=0))
    if args.nan_at_step:
        calls = {"n": 0}

        def nan_once(grad: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == args.nan_at_step else grad

        model.transformer.h[1].mlp.c_fc.weight.register_hook(nan_once)
    callback = GradWatchTrainerCallback(fail_on=("nonfinite",), diagnose_every_n_steps=20, histogram_every_n_steps=20)
    training_args = TrainingArguments(
        args.output_dir, max_steps=20 if args.fast else 100, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=10, report_to="tensorboard", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=synthetic_tokens(512), callbacks=[callback])
    trainer.train()
    if callback.stop_reason:
        logging.getLogger("gradwatch").warning("training stopped early: %s", callback.stop_reason)
    return callback


if __name__ == "__main__":
    # logging is configured by the script, not by main(): a caller's own logging setup stays untouched
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gradwatch").setLevel(logging.INFO)
    main()
