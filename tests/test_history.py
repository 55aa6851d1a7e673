"""Bounded history, long-term summary and DataFrame views."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from gradwatch.collect import GRAD_METRICS
from gradwatch.history import History, HistoryView, LayerMeta


def make_history(n_layers: int = 3, steps: int = 10, capacity: int = 8) -> History:
    h = History(capacity=capacity, sample_capacity=4, summary_slots=4)
    names = [f"l{i}" for i in range(n_layers)]
    cols = h.register_layers(names, [LayerMeta(type_name="Linear", depth=i) for i in range(n_layers)])
    for s in range(steps):
        values = np.full((n_layers, len(GRAD_METRICS)), float(s), dtype=np.float64)
        values[:, GRAD_METRICS.index("nonfinite")] = 0
        h.append_step(s, cols, values, total_norm=float(s), loss=1.0 / (s + 1))
    return h


def test_ring_keeps_the_most_recent_steps_and_memory_is_bounded() -> None:
    h = make_history(steps=5)
    size = h.nbytes
    for s in range(5, 5000):
        h.append_step(s, [0, 1, 2], np.ones((3, len(GRAD_METRICS))), 1.0)
    assert h.nbytes == size
    v = h.view()
    assert list(v.steps) == list(range(4992, 5000))
    assert h.total_steps == 5000


def test_long_term_summary_covers_the_whole_run_within_its_slots() -> None:
    h = make_history(steps=100)
    first, last, mean = h._summary.means()
    assert len(first) <= 4
    assert first[0] == 0 and last[-1] == 99
    # block means of the constant-per-step values are the mean step number of each block
    assert mean[0, 0, 0] == pytest.approx((first[0] + last[0]) / 2)
    df = h.to_dataframe(include_long_term=True)
    assert df["step"].min() < h.view().steps[0]


def test_to_dataframe_is_long_format_in_depth_order() -> None:
    h = make_history(steps=3)
    df = h.to_dataframe()
    assert list(df.columns) == ["step", "layer", "metric", "value", "depth"]
    sub = df[(df.layer == "l1") & (df.metric == "grad_norm")]
    assert list(sub.step) == [0, 1, 2] and list(sub.value) == [0.0, 1.0, 2.0]
    assert set(df[df.layer == "(total)"].metric) == {"grad_norm", "loss"}
    wide = h.summary_frame()
    assert list(wide.index) == ["l0", "l1", "l2"]
    assert wide.loc["l2", "grad_norm"] == pytest.approx(1.0)


def test_new_layers_get_columns_and_old_steps_read_nan() -> None:
    h = make_history(steps=2)
    cols = h.register_layers(["new"], [LayerMeta(type_name="Linear", depth=3)])
    assert cols == [3]
    h.append_step(2, [0, 1, 2, 3], np.ones((4, len(GRAD_METRICS))), 1.0)
    v = h.view()
    assert np.isnan(v.grad[0, 3, 0]) and v.grad[-1, 3, 0] == 1.0


def test_nonfinite_first_step_is_remembered_beyond_the_window() -> None:
    h = make_history(steps=2)
    values = np.zeros((3, len(GRAD_METRICS)))
    values[1, GRAD_METRICS.index("nonfinite")] = 4
    h.append_step(2, [0, 1, 2], values, 1.0)
    for s in range(3, 30):
        h.append_step(s, [0, 1, 2], np.zeros((3, len(GRAD_METRICS))), 1.0)
    assert h.first_nonfinite == (2, ["l1"])
    assert h.nonfinite_steps == 1


def test_from_dataframe_round_trips() -> None:
    h = make_history(steps=6)
    v = HistoryView.from_dataframe(h.to_dataframe())
    ref = h.view()
    assert v.layers == ref.layers
    np.testing.assert_allclose(v.grad, ref.grad, equal_nan=True)
    np.testing.assert_allclose(v.total_norm, ref.total_norm)


def test_bad_capacity_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="capacity"):
        History(capacity=0)


@pytest.mark.parametrize("capacity", [3, 7, 50])
def test_append_steps_equals_appending_one_by_one(capacity: int) -> None:
    """The batched append gives the same history (rings across wrap-around, summary, peaks, losses,
    non-finite bookkeeping) as appending the same steps one at a time."""
    rng = np.random.default_rng(capacity)
    names = ["a", "b", "c"]
    one, many = History(capacity=capacity), History(capacity=capacity)
    for h in (one, many):
        h.register_layers(names, [LayerMeta(type_name="Linear", fan_in=4, numel=20)] * 3)
    cols = [0, 1, 2]
    steps = list(range(23))
    values = rng.lognormal(0, 2, (len(steps), 3, len(GRAD_METRICS)))
    values[rng.random(values.shape) < 0.2] = np.nan
    values[5, 1, GRAD_METRICS.index("grad_to_weight")] = values[:, :, GRAD_METRICS.index("grad_to_weight")].max() * 2
    values[9, 2, GRAD_METRICS.index("grad_to_weight")] = values[5, 1, GRAD_METRICS.index("grad_to_weight")]  # a tie
    values[:, :, GRAD_METRICS.index("nonfinite")] = 0
    values[12, 0, GRAD_METRICS.index("nonfinite")] = 3
    totals = rng.random(len(steps)).tolist()
    losses = [math.nan, *rng.random(len(steps) - 1).tolist()]
    for s in steps:
        one.append_step(s, cols, values[s], totals[s], losses[s])
    for a, b in ((0, 4), (4, 5), (5, 16), (16, 23)):  # batches of several sizes, one of a single step
        many.append_steps(steps[a:b], cols, values[a:b], totals[a:b], losses[a:b])
    assert one.total_steps == many.total_steps == len(steps)
    assert one.first_nonfinite == many.first_nonfinite and one.nonfinite_steps == many.nonfinite_steps == 1
    pd.testing.assert_frame_equal(one.to_dataframe(), many.to_dataframe())
    v1, v2 = one.view(), many.view()
    np.testing.assert_array_equal(v1.steps, v2.steps)
    np.testing.assert_array_equal(v1.grad, v2.grad)
    np.testing.assert_array_equal(v1.peak_grad_to_weight, v2.peak_grad_to_weight)
    assert v1.initial_loss == v2.initial_loss
    np.testing.assert_array_equal(one._peak_step, many._peak_step)
