"""Mixed precision: the GradScaler's loss scale recorded from a real fp16 run (CPU autocast), and the
``underflow`` finding when the scale falls so low that fp16 gradients flush to zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Thresholds
from gradwatch.collect import GRAD_METRICS
from gradwatch.history import History, HistoryView, LayerMeta
from gradwatch.precision import underflow_findings


def _fp16_run(seed: int, steps: int = 120, drop_scale_at: int | None = None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10_000)
    g = torch.Generator().manual_seed(seed)
    x_all = torch.randn(1024, 32, generator=g)
    y_all = (x_all[:, :4] > 0).float()
    scales = []
    with gradwatch.watch(model, scaler=scaler, slow_stats_every_n=1, activations=False) as w:
        for t in range(steps):
            if t == drop_scale_at:
                scaler.update(new_scale=2.0**-16)  # as after a long run of overflows
            i = (t * 32) % 1024
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x_all[i:i + 32]).float(), y_all[i:i + 32])
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scales.append(scaler.get_scale())
            w.step(loss)  # after unscale_, before the optimizer step
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return w, w.diagnose(), scales


def test_the_loss_scale_of_a_real_grad_scaler_is_recorded_and_checkpointed() -> None:
    w, diag, scales = _fp16_run(0, steps=30)
    recorded = w.history.loss_scales
    assert [s for _, s in recorded] == scales and [t for t, _ in recorded] == list(range(30))
    assert w.history.context["amp_loss_scaling"] is True
    restored = History()
    restored.load_state_dict(w.history.state_dict())
    assert list(restored.loss_scales) == list(recorded)
    assert "underflow" not in diag.kinds()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_loss_scale_too_low_for_fp16_gradients_is_underflow(seed: int) -> None:
    _, healthy, _ = _fp16_run(seed)
    assert "underflow" not in healthy.kinds()
    w, diag, _ = _fp16_run(seed, drop_scale_at=70)
    (f,) = diag.by_kind("underflow")
    assert f.evidence["loss_scale"] <= Thresholds().underflow_max_scale
    assert f.fixes == ("mixed_precision",)
    report = gradwatch.apply_fixes(w.model, diag)
    assert [c.status for c in report.changes] == ["recommended"] and "bfloat16" in report.changes[0].reason


def _view(zero_early: float, zero_late: float, scale: float) -> HistoryView:
    steps, n = 40, 3
    grad = np.full((steps, n, len(GRAD_METRICS)), np.nan, dtype=np.float32)
    grad[:, :, GRAD_METRICS.index("grad_norm")] = 1.0
    grad[:, :, GRAD_METRICS.index("nonfinite")] = 0
    grad[:, :, GRAD_METRICS.index("grad_zero_frac")] = zero_early
    grad[30:, :, GRAD_METRICS.index("grad_zero_frac")] = zero_late
    return HistoryView(layers=["a", "b", "c"], layer_meta=[LayerMeta(depth=i) for i in range(n)], steps=np.arange(steps),
                       grad=grad, total_norm=np.ones(steps), loss=np.ones(steps), loss_scale=np.array([1024.0, scale]),
                       lowest_zero_frac=np.full(n, zero_early))


@pytest.mark.parametrize(("early", "late", "scale", "expected"), [
    (0.0, 0.5, 1.0, True),      # zeros rose while the scale is low
    (0.0, 0.5, 4096.0, False),  # a high scale: the zeros are not fp16's doing
    (0.4, 0.5, 1.0, False),     # a ReLU layer's natural zeros: no rise
    (0.0, 0.1, 1.0, False),     # below the rise threshold
])
def test_underflow_needs_a_rise_in_zeros_and_a_low_scale(early: float, late: float, scale: float, expected: bool) -> None:
    assert bool(underflow_findings(_view(early, late, scale), Thresholds())) is expected
