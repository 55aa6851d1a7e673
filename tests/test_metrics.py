"""The metric schema walked end to end: every metric reaches the DataFrame, TensorBoard and the logs
read back, and every column index agrees with the schema."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn

import gradwatch
from gradwatch import tags as T
from gradwatch.history import HistoryView
from gradwatch.logs import read_run
from gradwatch.metrics import (
    ACT_METRICS,
    ACTIVATION,
    GRAD,
    GRAD_METRICS,
    LAYER_SIGNAL_METRICS,
    MAX_ROWS,
    METRICS,
    PARTIALS,
    ROW,
    SIGNAL,
    SUM_ROWS,
    Cadence,
)

STEPS = 8


class _RecurrentNet(nn.Module):
    """An RNN (time decay), a ReLU (dead units, unit samples) and a Sigmoid (saturation)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 8, batch_first=True)
        self.fc1 = nn.Linear(8, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.sigmoid = nn.Sigmoid()
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.out(self.sigmoid(self.fc2(self.relu(self.fc1(h[:, -1])))))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """A short real run with every cadence firing: slow steps, the update after them, activation samples."""
    torch.manual_seed(0)
    logdir = tmp_path_factory.mktemp("schema") / "run"
    model = _RecurrentNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 6, 4), torch.randn(16, 1)
    grads: dict[str, float] = {}
    with gradwatch.watch(model, log_dir=logdir, slow_stats_every_n=2, activation_every_n_steps=2,
                         histogram_every_n_steps=0, on_error="raise") as w:
        for _ in range(STEPS):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            w.step(loss=loss)
            grads = {layer.name: math.sqrt(sum(float(p.grad.double().square().sum()) for p in layer.params))
                     for layer in w.layers}
            opt.step()
            opt.zero_grad()
        df = w.to_dataframe()
        view = w.history.view()
    return logdir, df, view, grads


def test_columns_agree_with_the_schema() -> None:
    for table, names in ((GRAD, GRAD_METRICS), (ACTIVATION, ACT_METRICS), (SIGNAL, LAYER_SIGNAL_METRICS)):
        assert table.names == names
        for column, metric in enumerate(table):
            assert metric.column == column == table[metric.name] == names.index(metric.name)
            assert metric.table == table.table
            assert isinstance(metric.cadence, Cadence)
    assert len({m.name for m in METRICS}) == len(METRICS)  # one name, one metric
    assert [p.row for p in PARTIALS] == list(range(len(PARTIALS)))
    assert sorted(SUM_ROWS + MAX_ROWS) == list(range(len(PARTIALS)))
    assert all(ROW[p.name] == p.row for p in PARTIALS)
    # every partial feeds a gradient metric, and every gradient metric names what it is derived from
    derived = " ".join(m.reduce for m in GRAD)
    assert all(p.name in derived.replace("(", " ").replace(")", " ").split() for p in PARTIALS)
    with pytest.raises(KeyError, match="grad_norm"):
        GRAD["no_such_metric"]


def test_every_metric_reaches_the_dataframe(run) -> None:
    _, df, _, _ = run
    assert set(df["metric"]) >= {m.name for m in METRICS}


def test_values_land_in_their_columns(run) -> None:
    """The last step's gradient norms, brute-forced in float64, are in the ``grad_norm`` column."""
    _, df, view, grads = run
    last = view.steps[-1]
    for i, name in enumerate(view.layers):
        assert view.grad[-1, i, GRAD["grad_norm"]] == pytest.approx(grads[name], rel=1e-5)
        row = df[(df["step"] == last) & (df["layer"] == name) & (df["metric"] == "grad_norm")]
        assert float(row["value"].iloc[0]) == pytest.approx(grads[name], rel=1e-5)


def test_every_metric_reaches_tensorboard_and_reads_back(run) -> None:
    logdir, df, view, _ = run
    acc = ea.EventAccumulator(str(logdir), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    parsed = [T.parse_tag(tag) for tag in acc.Tags()["scalars"]]
    written = {p.metric for p in parsed if p is not None and p.layer != T.TOTAL_LAYER}
    assert written >= {m.name for m in METRICS}

    back = read_run(logdir)
    assert set(back.frame["metric"]) >= {m.name for m in METRICS}
    rebuilt = HistoryView.from_dataframe(back.frame)
    assert rebuilt.layers == view.layers
    np.testing.assert_allclose(rebuilt.grad, view.grad, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(rebuilt.signal, view.signal, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(rebuilt.act, view.act, rtol=1e-6, equal_nan=True)
