"""The gradient-flow figure, from a live watcher's frame, from a Diagnosis, and from odd data."""

from __future__ import annotations

import math

import matplotlib
import pandas as pd
import pytest
from gw_testing import mlp, train, vector_task
from torch import nn

import gradwatch
from gradwatch.figure import (
    figure_from_dataframe,
    figure_from_diagnosis,
    figure_to_png,
    gradient_flow_figure,
    layer_profile,
    save_figure,
)


@pytest.fixture(scope="module")
def sigmoid_run():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = mlp(nn.Sigmoid, 10)
    with gradwatch.watch(model, activation_every_n_steps=10) as w:
        train(model, vector_task(), 30, watcher=w, lr=0.5)
        return w.to_dataframe(), w.diagnose(), [layer.name for layer in w.layers]


def collection(fig, gid: str):
    found = [c for c in fig.axes[0].collections if c.get_gid() == gid]
    return found[0] if found else None


def bar_heights(fig, gid: str) -> list[float]:
    return [float(path.vertices[:, 1].max()) for path in collection(fig, gid).get_paths()]


def test_from_dataframe_draws_mean_and_max_per_layer_in_depth_order(sigmoid_run) -> None:
    df, diag, layers = sigmoid_run
    assert diag.by_kind("vanishing")
    fig = figure_from_dataframe(df, diag)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == layers
    assert len(bar_heights(fig, "mean_bars")) == len(bar_heights(fig, "max_bars")) == len(layers)
    assert ax.get_yscale() == "log"
    vanishing = set(diag.by_kind("vanishing")[0].layers)
    assert len(collection(fig, "highlight_vanishing").get_paths()) == len(vanishing)  # one band per vanishing layer
    colors = {t.get_text(): t.get_color() for t in ax.get_xticklabels()}
    assert len({colors[n] for n in vanishing}) == 1 and colors[layers[-1]] not in {colors[n] for n in vanishing}
    assert "vanishing" in fig.get_suptitle()
    prof = layer_profile(df)
    assert list(prof.index) == layers
    assert (prof["grad_max_abs"] >= prof["grad_mean_abs"]).all()
    # the decay is visible: the first layer's mean |g| is orders of magnitude below the last one's
    assert prof["grad_mean_abs"].iloc[0] < 1e-3 * prof["grad_mean_abs"].iloc[-1]


def test_from_diagnosis_matches_its_table(sigmoid_run, tmp_path) -> None:
    _, diag, layers = sigmoid_run
    fig = figure_from_diagnosis(diag, name="sig")
    means = [row.grad_mean_abs for row in diag.layers]
    assert bar_heights(fig, "mean_bars") == pytest.approx(means)
    assert fig.get_suptitle().startswith("sig: gradient flow (steps")
    save_figure(fig, tmp_path / "flow.png")
    assert (tmp_path / "flow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_odd_values_and_empty_input_do_not_break_it() -> None:
    fig = gradient_flow_figure(["a", "b", "c"], [1e-3, 0.0, math.nan], [1e-2, 0.0, math.nan], flags={"a": ["exploding"]})
    assert figure_to_png(fig)[:4] == b"\x89PNG"
    markers = [line for line in fig.axes[0].lines if line.get_label() == "no gradient"]
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [1, 2]
    empty = figure_from_dataframe(pd.DataFrame(columns=["step", "layer", "metric", "value"]))
    assert figure_to_png(empty)[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="2 layers, 1 mean values"):
        gradient_flow_figure(["a", "b"], [1.0], [1.0, 2.0])


def test_many_layers_and_long_names_stay_readable() -> None:
    names = [f"encoder.layers.{i}.self_attention.out_projection" for i in range(200)]
    fig = gradient_flow_figure(names, [10.0 ** -(i / 20) for i in range(200)], [10.0 ** -(i / 25) for i in range(200)])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(labels) <= 60 and all(len(label) <= 28 for label in labels)
    assert labels[0].startswith("...") and labels[0].endswith("out_projection")
    assert fig.get_size_inches()[0] <= 24


def test_no_global_matplotlib_state_is_touched() -> None:
    backend = matplotlib.get_backend()
    gradient_flow_figure(["a"], [1.0], [2.0])
    assert matplotlib.get_backend() == backend
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []
