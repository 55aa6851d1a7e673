"""Per-step cost of ``GradWatchTrainerCallback`` on the tiny GPT-2 ``transformers.Trainer`` run.

The run of ``examples/hf_trainer.py`` (GPT-2, 2 layers, n_embd 32, batch 8 x 16 tokens, AdamW,
max_grad_norm 1.0), with and without the callback, each without and with TensorBoard
(``report_to="tensorboard"``). Each optimizer step is timed from ``on_step_begin`` to ``on_step_end``
(forward, backward, gradwatch, clipping, optimizer step), and so is the callback's own work on the
step (its ``on_pre_optimizer_step`` and ``on_step_end``: collection, clipping, sinks), which a busy
machine blurs less than whole steps; the first ``--warmup`` steps are dropped.
Conditions are run in interleaved rounds (the order rotates) and the median step time is reported.

    python benchmarks/hf_trainer_overhead.py [--rounds 3] [--steps 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from gradwatch.integrations.transformers import GradWatchTrainerCallback

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ("plain", "gradwatch", "plain+tb", "gradwatch+tb")


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (``on_step_begin`` -> ``on_step_end``)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.times.append(time.perf_counter() - self._t0)


class TimedCallback(GradWatchTrainerCallback):
    """The callback with its own per-step hooks timed (less exposed to a busy machine than step times)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.hook_times: list[float] = []
        self._spent = 0.0

    def on_pre_optimizer_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return super().on_pre_optimizer_step(*args, **kwargs)
        finally:
            self._spent = time.perf_counter() - t0

    def on_step_end(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return super().on_step_end(*args, **kwargs)
        finally:
            self.hook_times.append(self._spent + time.perf_counter() - t0)


def _tokens():  # the example's synthetic data
    spec = importlib.util.spec_from_file_location("hf_trainer_example", ROOT / "examples" / "hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_tokens(512), module.VOCAB, module.SEQ


def run(condition: str, steps: int, warmup: int, data, vocab: int, seq: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=seq, vocab_size=vocab,
                                       bos_token_id=0, eos_token_id=0))
    timer = StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    watched = TimedCallback(verbose=False) if condition.startswith("gradwatch") else None
    if watched is not None:
        callbacks.insert(0, watched)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
                                 logging_steps=10, report_to="tensorboard" if condition.endswith("+tb") else "none",
                                 save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    hooks = statistics.median(watched.hook_times[warmup:]) if watched is not None else 0.0
    return statistics.median(timer.times[warmup:]), hooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    logging.disable(logging.WARNING)
    data, vocab, seq = _tokens()
    results: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    hooks: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    for r in range(opts.rounds):
        order = CONDITIONS[r % len(CONDITIONS):] + CONDITIONS[:r % len(CONDITIONS)]
        for condition in order:
            step_time, hook_time = run(condition, opts.steps, opts.warmup, data, vocab, seq)
            results[condition].append(step_time)
            hooks[condition].append(hook_time)
    med = {c: statistics.median(v) * 1e3 for c, v in results.items()}
    hook_med = {c: statistics.median(v) * 1e3 for c, v in hooks.items()}
    lines = [f"tiny GPT-2 Trainer step (median of {opts.rounds} runs x {opts.steps - opts.warmup} steps, "
             f"{opts.threads} thread(s), torch {torch.__version__}):"]
    for c in CONDITIONS:
        base = med["plain+tb" if c.endswith("+tb") else "plain"]
        lines.append(f"  {c:<14} {med[c]:7.2f} ms/step   x{med[c] / base:.3f}  (+{med[c] - base:.2f} ms)"
                     + (f"   callback hooks {hook_med[c]:.2f} ms/step" if hook_med[c] else ""))
    print("\n".join(lines))
    if opts.json is not None:
        opts.json.write_text(json.dumps({"ms_per_step": med, "callback_ms_per_step": hook_med, "runs": {c: [t * 1e3 for t in v] for c, v in results.items()},
                                         "options": vars(opts) | {"json": str(opts.json)}}, indent=2))


if __name__ == "__main__":
    main()
