"""A collected step's way to the host: one packed copy, read back by name; the one step buffer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.collect import GRAD_METRICS, GradientCollector, StepStats
from gradwatch.hotpath import StepLaunch, device_rows, pack_step, read_host_row
from gradwatch.layers import discover_layers
from gradwatch.step_buffer import StepBuffer


def _collector_with_grads() -> GradientCollector:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model(torch.randn(16, 4)).pow(2).mean().backward()
    return GradientCollector(discover_layers(model))


@pytest.mark.parametrize("loss", [torch.tensor(0.25), 0.25, None])
def test_a_packed_step_reads_back_as_the_collector_computes_it(loss: object) -> None:
    collector = _collector_with_grads()
    partials = device_rows(collector.compute_on_device(slow=True))
    assert partials[0].device == torch.device("cpu") and partials[0].rows.ndim == 2
    sample = torch.arange(5.0)
    packed = pack_step(partials, sample, loss)
    assert packed.sample_size == 5 and (packed.loss is None) == isinstance(loss, torch.Tensor)
    launch = StepLaunch(step=3, slow=True, layouts=packed.layouts, sample_size=packed.sample_size, loss=packed.loss,
                        state=None, keep_out=False, diagnosing=False)
    row = read_host_row(packed.flat.cpu(), launch, collector)
    expected = collector.finish(None, [p.rows.cpu() for p in partials], True)
    np.testing.assert_array_equal(row.stats.values.numpy(), expected.values.numpy())
    assert row.stats.values.shape == (2, len(GRAD_METRICS))
    assert (math.isnan(row.loss) if loss is None else row.loss == pytest.approx(0.25))
    assert torch.equal(row.sample, sample)


def test_the_step_buffer_is_bounded_and_taken_whole_in_order() -> None:
    buffer = StepBuffer(capacity=3)
    stats = StepStats(values=torch.zeros(1, len(GRAD_METRICS), dtype=torch.float64), total_norm=0.0, nonfinite_layers=[])
    for step in range(3):
        assert not buffer.full
        buffer.add(step, stats, float(step))
    assert buffer.full and len(buffer) == 3
    assert [item.step for item in buffer.take()] == [0, 1, 2]
    assert not buffer and buffer.take() == []
    with pytest.raises(ValueError, match="capacity"):
        StepBuffer(capacity=0)
