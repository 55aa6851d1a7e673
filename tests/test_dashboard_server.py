"""The gradwatch TensorBoard tab against a real ``tensorboard`` server (``--load_fast=false``) over runs
written by ``gradwatch.watch``: the plugin is listed and active, and its routes return the history's values.

One server for the module (start-up costs seconds); the Lightning and demo runs, read with the default
``--load_fast``, are in ``tests/integrations/test_dashboard_lightning.py``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from gw_dashboard import PLUGIN, TensorBoard, cells
from gw_testing import mlp, train, vector_task
from torch import nn

import gradwatch

pytestmark = pytest.mark.slow
STEPS = 40


@pytest.fixture(scope="module")
def tb(tmp_path_factory: pytest.TempPathFactory):
    """Two runs (a vanishing sigmoid MLP and a healthy ReLU MLP), one server; yields (server, histories)."""
    logdir: Path = tmp_path_factory.mktemp("dashboard")
    frames = {}
    for name, act, steps in (("sigmoid", nn.Sigmoid, STEPS), ("relu", nn.ReLU, 10)):
        model = mlp(act, 8)
        with gradwatch.watch(model, log_dir=logdir / name, figure_every_n_steps=0, histogram_every_n_steps=0,
                             diagnose_every_n_steps=10) as w:
            train(model, vector_task(), steps, watcher=w)
        frames[name] = w.to_dataframe()
    server = TensorBoard(logdir, "--load_fast", "false")
    try:
        server.wait_for_runs({"sigmoid": STEPS, "relu": 10})
        yield server, frames
    finally:
        server.stop()


def matrix(frame: pd.DataFrame, metric: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Layers in depth order, steps, and the float32 layers x steps matrix of one metric of a live history."""
    rows = frame[(frame["metric"] == metric) & (frame["layer"] != "(total)")]
    wide = rows.pivot_table(index=["depth", "layer"], columns="step", values="value", aggfunc="first").sort_index()
    return [layer for _, layer in wide.index], wide.columns.to_numpy(), wide.to_numpy(dtype=np.float32)


def test_plugin_is_listed_active_and_loads_in_an_iframe(tb) -> None:
    server, _ = tb
    status, listing, _ = server.get("/data/plugins_listing")
    assert status == 200
    entry = listing["gradwatch"]
    assert entry["enabled"] is True and entry["tab_name"] == "gradwatch"
    assert entry["loading_mechanism"] == {"type": "IFRAME", "module_path": PLUGIN + "index.js"}
    status, js, ctype = server.get(PLUGIN + "index.js")
    assert status == 200 and "javascript" in ctype and "export async function render" in js
    status, css, ctype = server.get(PLUGIN + "style.css")
    assert status == 200 and ctype.startswith("text/css")


def test_runs_lists_gradwatch_runs_with_their_metrics(tb) -> None:
    server, frames = tb
    body = server.plugin("runs")
    runs = {r["run"]: r for r in body["runs"]}
    assert set(runs) == {"sigmoid", "relu"}
    assert body["default_metric"] == "grad_to_weight" and set(body["aggregates"]) == {"min", "median", "max"}
    sig = runs["sigmoid"]
    assert sig["metrics"][0] == "grad_to_weight"
    assert {"grad_norm", "grad_max_abs", "update_ratio", "nonfinite", "saturated_frac"} <= set(sig["metrics"])
    assert sig["layers"]["grad_norm"] == 8
    assert {"grad_norm", "loss"} <= set(sig["totals"])
    assert sig["last_step"] == STEPS - 1 and runs["relu"]["last_step"] == 9  # the frontend redraws when it moves


@pytest.mark.parametrize("metric", ["grad_to_weight", "grad_norm", "saturated_frac"])
def test_heatmap_holds_exactly_the_history_values_in_depth_order(tb, metric: str) -> None:
    server, frames = tb
    layers, steps, expected = matrix(frames["sigmoid"], metric)
    body = server.plugin("heatmap", run="sigmoid", metric=metric, width=1000, height=1000, agg="median")
    assert body["layers_per_row"] == 1 and body["steps_per_column"] == 1
    assert [row["layer"] for row in body["rows"]] == layers
    assert [row["depth"] for row in body["rows"]] == sorted(row["depth"] for row in body["rows"])
    assert body["step_first"] == body["step_last"] == [int(s) for s in steps]
    got = cells(body)
    assert got.shape == expected.shape == (body["n_layers"], body["n_steps"])
    np.testing.assert_array_equal(got, expected)  # TensorBoard stores float32: nothing else is lost
    positive = expected[np.isfinite(expected) & (expected > 0)]
    if not positive.size:  # e.g. no unit saturated: no logarithm, no colour range (drawn as "<= 0")
        assert body["decades"] is None
        return
    lo, hi = body["decades"]
    assert lo <= math.log10(positive.min()) and math.log10(positive.max()) <= hi and lo == int(lo)


def brute_force(full: np.ndarray, r: int, k: int, agg: str) -> np.ndarray:
    """Cell (i, j) = agg of rows [i*r, (i+1)*r) x columns [j*k, (j+1)*k), missing values ignored: plain loops."""
    reduce = {"min": min, "max": max, "median": statistics.median}[agg]
    n_rows, n_cols = math.ceil(full.shape[0] / r), math.ceil(full.shape[1] / k)
    out = np.full((n_rows, n_cols), np.nan)
    for i in range(n_rows):
        for j in range(n_cols):
            vals = [float(v) for v in full[i * r:(i + 1) * r, j * k:(j + 1) * k].ravel() if not math.isnan(v)]
            if vals:
                out[i, j] = reduce(vals)
    return out


@pytest.mark.parametrize("agg", ["min", "median", "max"])
@pytest.mark.parametrize(("width", "height"), [(7, 3), (13, 8), (40, 5)])
def test_downsampling_matches_a_direct_computation(tb, agg: str, width: int, height: int) -> None:
    server, frames = tb
    _, steps, full = matrix(frames["sigmoid"], "grad_to_weight")
    body = server.plugin("heatmap", run="sigmoid", metric="grad_to_weight", width=width, height=height, agg=agg)
    r, k = math.ceil(8 / height), math.ceil(STEPS / width)
    assert (body["layers_per_row"], body["steps_per_column"]) == (r, k)
    assert body["step_first"] == [int(s) for s in steps[::k]]
    assert body["step_last"] == [int(steps[min(j + k, len(steps)) - 1]) for j in range(0, len(steps), k)]
    assert [row["layer"] for row in body["rows"]] == matrix(frames["sigmoid"], "grad_to_weight")[0][::r]
    np.testing.assert_allclose(cells(body), brute_force(full, r, k, agg), rtol=1e-6)


def test_profile_and_layer_drill_downs(tb) -> None:
    server, frames = tb
    layers, steps, full = matrix(frames["sigmoid"], "grad_norm")
    profile = server.plugin("profile", run="sigmoid", metric="grad_norm", step=int(steps[17]))
    assert profile["step"] == steps[17] and profile["layers"] == layers
    np.testing.assert_array_equal(np.array(profile["values"], dtype=np.float32), full[:, 17])
    nearest = server.plugin("profile", run="sigmoid", metric="grad_norm", step=10**9)
    assert nearest["step"] == steps[-1]

    layer = layers[0]
    series = server.plugin("layer", run="sigmoid", layer=layer)["series"]
    frame = frames["sigmoid"]
    for metric in ("grad_norm", "grad_to_weight", "update_ratio"):
        want = frame[(frame["layer"] == layer) & (frame["metric"] == metric)].sort_values("step")
        assert series[metric]["steps"] == want["step"].tolist()
        np.testing.assert_array_equal(np.array(series[metric]["values"], dtype=np.float32),
                                      want["value"].to_numpy(dtype=np.float32))


def test_findings_mark_where_the_diagnosis_changed_and_name_layers(tb) -> None:
    server, frames = tb
    findings = server.plugin("findings", run="sigmoid")["findings"]
    assert findings, "the vanishing sigmoid MLP logged no diagnosis"
    first = findings[0]
    assert "vanishing" in first["kinds"] and first["step"] % 10 == 0
    layers = matrix(frames["sigmoid"], "grad_norm")[0]
    assert first["layers"] and layers[0] in first["layers"] and set(first["layers"]) <= set(layers) | {
        r["layer"] for r in server.plugin("heatmap", run="sigmoid", metric="saturated_frac")["rows"]}
    assert first["text"].startswith("**step")


@pytest.mark.parametrize(("route", "params", "status", "says"), [
    ("heatmap", {"run": "nope"}, 404, "no gradwatch run named 'nope'"),
    ("heatmap", {}, 400, "missing query parameter 'run'"),
    ("heatmap", {"run": "sigmoid", "metric": "loss_of_faith"}, 404, "unknown metric 'loss_of_faith'"),
    ("heatmap", {"run": "sigmoid", "width": 0}, 400, "width must be in [1, 8192]"),
    ("heatmap", {"run": "sigmoid", "height": 10**12}, 400, "height must be in"),
    ("heatmap", {"run": "sigmoid", "width": "wide"}, 400, "width must be an integer"),
    ("heatmap", {"run": "sigmoid", "agg": "mean"}, 400, "agg must be one of median, min, max"),
    ("profile", {"run": "sigmoid", "step": -5}, 400, "step must be in"),
    ("profile", {"run": "sigmoid"}, 400, "missing query parameter 'step'"),
    ("layer", {"run": "sigmoid", "layer": "no.such.layer"}, 404, "has no layer 'no.such.layer'"),
    ("findings", {"run": "../../etc"}, 404, "no gradwatch run named"),
])
def test_bad_requests_get_a_4xx_json_message(tb, route: str, params: dict, status: int, says: str) -> None:
    server, _ = tb
    got, body, ctype = server.get(PLUGIN + route, **params)
    assert got == status and ctype.startswith("application/json"), (got, body)
    assert says in body["error"] and "Traceback" not in body["error"]


def test_heatmap_of_another_metric_is_read_fresh_and_cached(tb) -> None:
    """The cache is keyed by (run, metric): switching metrics never returns the previous metric's values."""
    server, frames = tb
    a = cells(server.plugin("heatmap", run="relu", metric="grad_norm"))
    b = cells(server.plugin("heatmap", run="relu", metric="grad_max_abs"))
    np.testing.assert_array_equal(a, matrix(frames["relu"], "grad_norm")[2])
    np.testing.assert_array_equal(b, matrix(frames["relu"], "grad_max_abs")[2])
    np.testing.assert_array_equal(cells(server.plugin("heatmap", run="relu", metric="grad_norm")), a)
