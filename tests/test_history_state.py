"""History.state_dict()/load_state_dict(): a checkpointed history continues where it stopped."""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

import gradwatch
from gradwatch.history import History, LayerMeta


def _trained_watcher(steps: int, capacity: int = 1000) -> gradwatch.GradWatcher:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = gradwatch.watch(model, activation_every_n_steps=2, history_capacity=capacity)
    for _ in range(steps):
        model(torch.randn(16, 6)).square().mean().backward()
        watcher.step()
        opt.step()
        opt.zero_grad()
    return watcher


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_roundtrip_through_weights_only_checkpoint() -> None:
    watcher = _trained_watcher(7)
    state = _roundtrip(watcher.history.state_dict())
    restored = History()
    restored.load_state_dict(state)
    a, b = watcher.history.view(), restored.view()
    assert a.layers == b.layers and a.activations == b.activations
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_array_equal(a.grad, b.grad)
    np.testing.assert_array_equal(a.act, b.act)
    np.testing.assert_array_equal(a.signal, b.signal)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert restored.total_steps == watcher.history.total_steps == 7
    pd_a = watcher.history.to_dataframe(include_long_term=True)
    pd_b = restored.to_dataframe(include_long_term=True)
    assert pd_a.equals(pd_b)
    watcher.close()


def test_load_keeps_existing_columns_and_maps_by_name() -> None:
    watcher = _trained_watcher(3)
    state = watcher.history.state_dict()
    target = History()
    # registered in a different order (and with one extra layer) before loading
    names = list(reversed(watcher.history.layers)) + ["extra"]
    cols = target.register_layers(names, [LayerMeta(depth=i) for i in range(len(names))])
    target.load_state_dict(state)
    assert target.register_layers(names, [LayerMeta(depth=i) for i in range(len(names))]) == cols
    src = watcher.history.to_dataframe().set_index(["step", "layer", "metric"])["value"]
    dst = target.to_dataframe().set_index(["step", "layer", "metric"])["value"]
    assert src.sort_index().equals(dst.sort_index())
    watcher.close()


def test_load_into_smaller_capacity_keeps_the_newest() -> None:
    watcher = _trained_watcher(6)
    target = History(capacity=4)
    target.load_state_dict(watcher.history.state_dict())
    assert list(target.view().steps) == [2, 3, 4, 5]
    assert target.total_steps == 6
    watcher.close()


def test_old_or_partial_state_loads_with_defaults() -> None:
    target = History()
    target.load_state_dict({"layers": ["a"], "layer_meta": {"a": {"depth": 0, "unknown_key": 1}}})
    assert target.layers == ["a"] and target.total_steps == 0
