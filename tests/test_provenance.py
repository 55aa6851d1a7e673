"""Non-finite provenance: real tiny models that go NaN for different reasons, diagnosed at the end of the run
(when the whole recent window is NaN), through the live watcher, a checkpointed history and the logs' frame."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Thresholds, provenance
from gradwatch.history import History, HistoryView


def _train(kind: str, seed: int = 0, steps: int = 150) -> gradwatch.GradWatcher:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5 if kind == "large_updates" else 0.01)
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(512, 16, generator=g)
    targets = inputs.sum(1, keepdim=True)
    watcher = gradwatch.watch(model, optimizer=opt, activations=kind != "no_activations")
    for t in range(steps):
        i = (t * 32) % 512
        x, y = inputs[i:i + 32].clone(), targets[i:i + 32]
        if kind == "nonfinite_loss" and t == 40:
            x[0, 0] = float("nan")  # one corrupt example
        out = model(x)
        if kind == "backward_op" and t >= 40:
            out = torch.sqrt(out - out.detach())  # value 0, derivative inf
        loss = ((out - y) ** 2).mean()
        loss.backward()
        watcher.step(loss)
        opt.step()
        opt.zero_grad()
    watcher.close()
    return watcher


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cause", ["large_updates", "nonfinite_loss", "backward_op"])
def test_the_cause_of_the_first_nan_is_named_after_the_window_is_all_nan(cause: str, seed: int) -> None:
    watcher = _train(cause, seed)
    window = watcher.history.view(last=watcher.thresholds.window)
    assert (window.grad[:, :, 4] > 0).all(axis=1).all(), "the recent window should be all non-finite"
    (f,) = watcher.diagnose().by_kind("nonfinite")
    assert f.evidence["cause"] == cause, f.message
    prov = f.evidence["provenance"]
    # the non-finite layer nearest the loss: where backward met the NaN first
    assert f.evidence["origin"] == prov["nonfinite_layers"][-1]
    if cause != "large_updates":
        assert f.evidence["origin"] == "4"  # a NaN loss reaches the last layer first
    assert "Cause:" in f.message
    assert prov["step"] == f.evidence["first_step"] and prov["steps_before"] > 0
    if cause == "large_updates":
        assert prov["total_norm_growth_decades"] >= 2 and prov["grew_most"]
    else:
        assert f.evidence["first_step"] == 40 and not prov["grew_most"]


def test_provenance_survives_a_checkpoint_and_the_logs_frame() -> None:
    watcher = _train("nonfinite_loss")
    restored = History()
    restored.load_state_dict(watcher.history.state_dict())
    assert restored.nonfinite_provenance == watcher.history.nonfinite_provenance
    frame = watcher.history.to_dataframe()
    view = HistoryView.from_dataframe(frame)  # what `gradwatch report` rebuilds from the logs
    cause, text = provenance.explain(view.nonfinite_provenance, Thresholds())
    assert cause == "nonfinite_loss" and "step 40" in text


def test_forward_overflow_and_loss_scale_are_named_from_the_evidence() -> None:
    base = {"step": 9, "origin": "head", "loss_finite_at_step": False, "steps_before": 9,
            "total_norm_growth_decades": 0.1, "max_update_ratio": 0.01}
    fwd = {**base, "forward": {"step": 8, "growth_decades": 4.0, "max_rms": 3e5, "largest_layer": "fc9"}}
    assert provenance.explain(fwd, Thresholds())[0] == "forward_overflow"
    assert provenance.explain(base, Thresholds())[0] == "nonfinite_loss"
    assert provenance.explain({**base, "amp_loss_scaling": True}, Thresholds())[0] == "loss_scale_overflow"
    assert provenance.explain({**base, "max_update_ratio": 2.0}, Thresholds())[0] == "large_updates"
