"""Nothing of the user's is altered without consent: with ``auto_fix`` off, a whole training run with
gradwatch attached (defaults plus TensorBoard logs) leaves weights, gradients, buffers, optimizer
state, modes, hooks and the global RNG bit-for-bit identical to the same run without it.

The model exercises every hook gradwatch can attach: a GRU fed the raw input (on sampled steps the
time-decay probe swaps in ``x.detach().requires_grad_()``), Conv1d+BatchNorm (channel-first
activations, buffers), Dropout (draws from the global RNG: a stray random call would change every
later mask), ReLU/Sigmoid activation statistics, tied weights. 120 steps cover activation samples
(every 50), histograms and diagnoses (every 100) and the figure at close.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hw_helpers import assert_identical, state_bits
from torch import nn

import gradwatch

STEPS = 120


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.2)
        self.proj = nn.Linear(8, 8)
        self.sig = nn.Sigmoid()
        self.head = nn.Linear(8, 8)
        self.head.weight = self.proj.weight  # tied: counted once, for its first owner
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        h = self.drop(self.relu(self.bn(self.conv(h.transpose(1, 2))))).mean(2)
        return self.out(self.head(self.sig(self.proj(h))))


def train(watch: dict | None, log_dir: Path, hooked: bool) -> tuple[dict, torch.Tensor, gradwatch.GradWatcher | None]:
    torch.manual_seed(0)
    model = Zoo()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    data = torch.Generator().manual_seed(1)
    watcher = None
    if watch is not None:
        watcher = gradwatch.watch(model, log_dir=log_dir, optimizer=opt if hooked else None, **watch)
    for _ in range(STEPS):
        x = torch.randn(16, 6, 4, generator=data)
        y = torch.randint(0, 3, (16,), generator=data)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if watcher is not None:
            watcher.step(loss)
        opt.step()
        if _ < STEPS - 1:  # the last gradients stay, to be compared too
            opt.zero_grad()
    if watcher is not None:
        watcher.close()
    return state_bits(model, opt), torch.get_rng_state(), watcher


@pytest.mark.slow
@pytest.mark.parametrize("hooked", [False, True], ids=["watcher.step", "optimizer-hook"])
def test_plain_pytorch_run_is_bitwise_identical_with_and_without_gradwatch(tmp_path: Path, hooked: bool) -> None:
    plain, rng_plain, _ = train(None, tmp_path, hooked)
    watched, rng_watched, watcher = train({}, tmp_path, hooked)
    assert watcher is not None and watcher.error is None and watcher.collected == STEPS
    df = watcher.to_dataframe()
    assert df[df.metric == "dead_frac"].step.nunique() >= 3  # activations were sampled (hooks did run)
    assert df[(df.metric == "time_decay_decades") & (df.layer == "rnn")].value.notna().any()  # the input swap ran
    assert list(tmp_path.glob("events.out.tfevents*"))
    assert_identical(plain, watched)
    assert torch.equal(rng_plain, rng_watched)  # no random number drawn by gradwatch


@pytest.mark.slow
def test_lightning_run_is_bitwise_identical_with_and_without_the_callback(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    from hw_lit import TRAINER_DEFAULTS, LitNet
    from lightning.pytorch.loggers import TensorBoardLogger

    from gradwatch.integrations.lightning import GradWatchCallback

    results = []
    for watched in (False, True):
        L.seed_everything(0, verbose=False)
        model = LitNet()
        callbacks = [GradWatchCallback(activation_every_n_steps=5, histogram_every_n_steps=5,
                                       diagnose_every_n_steps=10, verbose=False)] if watched else []
        trainer = L.Trainer(**{**TRAINER_DEFAULTS, "max_epochs": 3, "callbacks": callbacks, "log_every_n_steps": 1,
                               "logger": TensorBoardLogger(str(tmp_path), name="on" if watched else "off")})
        trainer.fit(model)
        results.append((state_bits(model, trainer.optimizers[0]), torch.get_rng_state(), trainer.global_step))
        if watched:
            cb = callbacks[0]
            assert cb.watcher is not None and cb.watcher.error is None and cb.watcher.collected == trainer.global_step
            assert list((tmp_path / "on").rglob("events.out.tfevents*"))
    (plain, rng_plain, steps_plain), (watched_state, rng_watched, steps_watched) = results
    assert steps_plain == steps_watched == 36
    assert_identical(plain, watched_state)
    assert torch.equal(rng_plain, rng_watched)
