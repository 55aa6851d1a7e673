"""``gradwatch.watch(model, optimizer=opt)`` in a plain ``accelerate`` loop (after ``accelerator.prepare``)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import gradwatch

accelerate = pytest.importorskip("accelerate")


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate's state is a process-wide singleton fixed by the first ``Accelerator``; reset it as
    ``transformers.TrainingArguments`` does, so each test chooses its own mixed precision."""
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    yield
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def _layer_norm(module: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in module.parameters()))


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerated_optimizer_is_hooked_and_collects_once_per_synced_step(mixed_precision: str) -> None:
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True, mixed_precision=mixed_precision)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    model, opt = accelerator.prepare(model, torch.optim.Adam(model.parameters(), 1e-3))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    expected = []
    with gradwatch.watch(model, optimizer=opt, on_error="raise") as watcher:
        for _ in range(6):
            with accelerator.accumulate(model):
                accelerator.backward(model(torch.randn(3, 4)).pow(2).mean())
                if accelerator.sync_gradients:
                    expected.append(_layer_norm(model[0]))
                opt.step()
                opt.zero_grad()
        df = watcher.to_dataframe()
        assert watcher.history.context["optimizer"] == "Adam"  # the wrapped optimizer decides the fixes
    # 6 micro-batches, accumulation 2: 3 optimizer steps, each collected once with the accumulated gradient
    norms = df[(df.metric == "grad_norm") & (df.layer == "0")].sort_values("step").value.tolist()
    assert len(norms) == 3
    assert norms == pytest.approx(expected, rel=1e-5)


def test_optimizer_without_step_hooks_gets_a_gradwatch_error() -> None:
    class Broken(torch.optim.Optimizer):
        def __init__(self, params: list[nn.Parameter]) -> None:  # a wrapper that never runs Optimizer.__init__
            self.param_groups = [{"params": params, "lr": 0.1}]

    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="does not support optimizer step hooks.*hook_optimizer=False"):
        gradwatch.watch(model, optimizer=Broken(list(model.parameters())))
