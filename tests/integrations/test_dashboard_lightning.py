"""The gradwatch TensorBoard tab over a Lightning ``TensorBoardLogger`` run and a ``gradwatch demo`` run,
served by a real ``tensorboard`` with its default loader (``--load_fast``: the Rust data server where it
ships; TensorBoard falls back to the Python loader otherwise)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
from gw_dashboard import TensorBoard, cells
from lightning.pytorch.loggers import TensorBoardLogger
from lit_models import TRAINER_DEFAULTS, LitMLP
from torch import nn

from gradwatch import demo
from gradwatch.integrations.lightning import GradWatchCallback

pytestmark = pytest.mark.slow
DEMO_STEPS = 30


@pytest.fixture(scope="module")
def tb(tmp_path_factory: pytest.TempPathFactory):
    logdir: Path = tmp_path_factory.mktemp("dashboard_lightning")
    callback = GradWatchCallback(activation_every_n_steps=2)
    logger = TensorBoardLogger(str(logdir), name="lit", version=0)
    trainer = L.Trainer(**{**TRAINER_DEFAULTS, "default_root_dir": str(logdir), "logger": logger,
                           "enable_checkpointing": False, "max_epochs": 2, "callbacks": [callback]})
    trainer.fit(LitMLP(act=nn.Sigmoid, depth=6))
    demo.run_case("sigmoid_mlp", steps=DEMO_STEPS, logdir=logdir / "demo")
    server = TensorBoard(logdir)
    try:
        steps = int(callback.to_dataframe()["step"].nunique())
        server.wait_for_runs({"lit/version_0": steps, "demo/sigmoid_mlp/before": DEMO_STEPS,
                              "demo/sigmoid_mlp/after": DEMO_STEPS})
        yield server, callback
    finally:
        server.stop()


def test_lightning_logger_run_matches_the_callbacks_history(tb) -> None:
    server, callback = tb
    frame = callback.to_dataframe()
    rows = frame[(frame["metric"] == "grad_norm") & (frame["layer"] != "(total)")]
    wide = rows.pivot_table(index=["depth", "layer"], columns="step", values="value", aggfunc="first").sort_index()
    body = server.plugin("heatmap", run="lit/version_0", metric="grad_norm", width=2000, height=2000)
    assert [r["layer"] for r in body["rows"]] == [layer for _, layer in wide.index] == [f"net.{2 * i}" for i in range(6)]
    assert body["step_first"] == [int(s) for s in wide.columns]
    np.testing.assert_array_equal(cells(body), wide.to_numpy(dtype=np.float32))
    runs = {r["run"]: r for r in server.plugin("runs")["runs"]}
    assert runs["lit/version_0"]["layers"]["saturated_frac"] == 5  # the sigmoids: activations are their own rows


def test_demo_runs_before_and_after_are_served(tb) -> None:
    server, _ = tb
    before = server.plugin("heatmap", run="demo/sigmoid_mlp/before", width=2000, height=2000)
    after = server.plugin("heatmap", run="demo/sigmoid_mlp/after", width=2000, height=2000)
    for body in (before, after):
        assert body["metric"] == "grad_to_weight" and body["n_steps"] == DEMO_STEPS
        assert np.isfinite(cells(body)).all()
    # the fix is visible in the data the heatmap draws: early/late layer ratio moves up by decades
    def spread(body: dict) -> float:
        values = np.log10(cells(body))
        return float(np.median(values[-1]) - np.median(values[0]))

    assert spread(before) > spread(after) + 1
    findings = server.plugin("findings", run="demo/sigmoid_mlp/before")["findings"]
    assert any("vanishing" in f["kinds"] for f in findings)
