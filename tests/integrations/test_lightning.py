"""GradWatchCallback with real (single-process) ``lightning.Trainer`` runs on small models."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lit_models import TRAINER_DEFAULTS, LitMLP, LitTwoOptimizers
from torch import nn

from gradwatch.integrations.lightning import GradientHealthError, GradWatchCallback

ROOT = Path(__file__).resolve().parents[2]


def _trainer(tmp_path: Path, callback: GradWatchCallback, **kwargs: object) -> L.Trainer:
    options = {**TRAINER_DEFAULTS, "default_root_dir": str(tmp_path), "logger": False, "enable_checkpointing": False,
               "max_epochs": 1, "callbacks": [callback]}
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.fixture
def lightning_messages() -> Iterator[list[str]]:
    """Messages Lightning's rank-zero utilities log (the 'lightning.pytorch' logger does not propagate)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _grad_norms(callback: GradWatchCallback) -> pd.DataFrame:
    df = callback.to_dataframe()
    return df[(df.metric == "grad_norm") & (df.layer != "(total)")].pivot(index="step", columns="layer", values="value")


# -- arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"histogram_every_n_steps": -1}, "histogram_every_n_steps must be an integer >= 0"),
        ({"histogram_max_elements": 0}, "histogram_max_elements must be an integer >= 1"),
        ({"slow_stats_every_n": 0}, "slow_stats_every_n must be an integer >= 1"),
        ({"fail_on": ("nan",)}, "allowed: .*'nonfinite'"),
        ({"metrics": ("grad_nrm",)}, "allowed: .*'grad_norm'"),
        ({"auto_fix": ("magic",)}, "allowed: .*'clip_gradients'"),
        ({"on_error": "ignore"}, "'detach' or 'raise'"),
        ({"optimizers": [-1]}, "optimizer indices"),
        ({"history_capacity": 1}, "history_capacity must be an integer >= 2"),
    ],
)
def test_arguments_are_validated_with_the_allowed_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradWatchCallback(**kwargs)


def test_thresholds_type_is_checked() -> None:
    with pytest.raises(TypeError, match="gradwatch.Thresholds"):
        GradWatchCallback(thresholds={"window": 10})


def test_results_before_fit_raise_a_clear_error() -> None:
    callback = GradWatchCallback()
    assert callback.diagnosis is None
    with pytest.raises(RuntimeError, match="after `trainer.fit"):
        callback.to_dataframe()


# -- the right moment --------------------------------------------------------------------------------
def test_accumulation_collects_once_per_optimizer_step_before_clipping(tmp_path: Path) -> None:
    model = LitMLP(record_reference=True)  # 64 samples / batch 8 = 8 batches
    callback = GradWatchCallback()
    trainer = _trainer(tmp_path, callback, accumulate_grad_batches=4, max_epochs=2, gradient_clip_val=1e-4)
    trainer.fit(model)
    norms = _grad_norms(callback)
    assert list(norms.index) == [0, 1, 2, 3] == sorted(model.reference)  # 2 epochs x 8 batches / 4
    assert callback.watcher is not None and callback.watcher.calls == 4
    for step, ref in model.reference.items():  # the accumulated, not yet clipped gradients
        for layer, stats in ref.items():
            assert norms.loc[step, layer] == pytest.approx(stats["grad_norm"], rel=1e-5)
    total = callback.to_dataframe().query("layer == '(total)' and metric == 'grad_norm'")["value"]
    assert (total > 1e-3).all()  # clipping to 1e-4 happened after the statistics were read


def test_every_n_steps_counts_optimizer_steps(tmp_path: Path) -> None:
    callback = GradWatchCallback(every_n_steps=3)
    _trainer(tmp_path, callback, max_epochs=2).fit(LitMLP())
    assert list(_grad_norms(callback).index) == [0, 3, 6, 9, 12, 15]


def test_root_forward_not_called_still_records_order_and_activations(tmp_path: Path) -> None:
    callback = GradWatchCallback(activation_every_n_steps=2)
    _trainer(tmp_path, callback).fit(LitMLP(call_root=False, act=nn.ReLU))
    watcher = callback.watcher
    assert watcher is not None and watcher.error is None
    assert watcher.structure["order"][:3] == ["net.0", "net.1", "net.2"]
    df = callback.to_dataframe()
    dead = df[df.metric == "dead_frac"]
    assert sorted(dead.step.unique()) == [0, 2, 4, 6]  # sampled every 2nd collected step, not every forward
    assert set(dead.layer) == {"net.1", "net.3"}


def test_manual_optimization_with_two_optimizers(tmp_path: Path) -> None:
    callback = GradWatchCallback()
    _trainer(tmp_path, callback).fit(LitTwoOptimizers())  # 4 batches x 2 optimizer steps
    norms = _grad_norms(callback)
    assert list(norms.index) == list(range(8))
    first = ["first.0", "first.2"]
    # the first optimizer's steps see its own layers' gradients only, and vice versa
    assert norms.loc[0::2, first].notna().all().all() and norms.loc[0::2, "second.0"].isna().all()
    assert norms.loc[1::2, "second.0"].notna().all() and norms.loc[1::2, first].isna().all().all()
    assert callback.watcher is not None
    assert callback.watcher.history.context["optimizer"] == "SGD, Adam"

    only_first = GradWatchCallback(optimizers=0)
    _trainer(tmp_path, only_first).fit(LitTwoOptimizers())
    assert list(_grad_norms(only_first).index) == [0, 2, 4, 6]


# -- precision -----------------------------------------------------------------------------------------
def test_bf16_mixed_statistics_are_finite_float32(tmp_path: Path) -> None:
    callback = GradWatchCallback()
    _trainer(tmp_path, callback, precision="bf16-mixed").fit(LitMLP())
    assert callback.watcher is not None
    view = callback.watcher.history.view()
    assert view.grad.dtype == np.float32
    norms = view.metric("grad_norm")
    assert norms.shape == (8, 3) and np.isfinite(norms).all() and (norms > 0).all()
    assert callback.watcher.history.context["amp_loss_scaling"] is False  # bf16: no GradScaler
    assert callback.diagnosis is not None and "nonfinite" not in callback.diagnosis.kinds()


class _AdamMLP(LitMLP):
    def __init__(self, fused: bool, **kwargs: object) -> None:
        super().__init__(record_reference=True, **kwargs)
        self.fused = fused

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=self.fused)


def _grad_scaler_plugin(init_scale: float) -> MixedPrecision:
    """The ``16-mixed`` GradScaler path, on CPU (``precision="16-mixed"`` alone becomes bf16 there)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_16_mixed_grad_scaler_statistics_are_unscaled_also_for_fused_optimizers(tmp_path: Path) -> None:
    norms, models = {}, {}
    for fused in (False, True):
        torch.manual_seed(0)
        callback = GradWatchCallback()
        models[fused] = model = _AdamMLP(fused)
        _trainer(tmp_path, callback, plugins=[_grad_scaler_plugin(2.0**10)]).fit(model)
        assert callback.watcher is not None and callback.watcher.history.context["amp_loss_scaling"] is True
        norms[fused] = _grad_norms(callback)
    # Lightning unscales before on_before_optimizer_step for ordinary optimizers ...
    assert norms[False].loc[0, "net.0"] == pytest.approx(models[False].reference[0]["net.0"]["grad_norm"], rel=1e-6)
    # ... but not for fused ones (they unscale inside step()): the callback divides by the scale
    assert models[True].reference[0]["net.0"]["grad_norm"] == pytest.approx(2.0**10 * norms[True].loc[0, "net.0"], rel=1e-6)
    np.testing.assert_allclose(norms[True].loc[0].to_numpy(), norms[False].loc[0].to_numpy(), rtol=1e-6)


def test_the_fused_unscaling_divides_on_the_device_without_reading_the_scale() -> None:
    # get_scale() is a host read of the scaler's device tensor: a synchronisation at every step on a GPU
    from gradwatch.integrations.lightning_amp import AmpUnscaler
    from gradwatch.metrics import PARTIALS, ROW

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()  # the scale now lives in a tensor

    def host_read() -> float:
        raise AssertionError("the loss scale was read on the host")

    scaler.get_scale = host_read
    unscaler = AmpUnscaler(scaler)
    unscaler.prepare(opt)
    out = unscaler(torch.ones(len(PARTIALS), 3))
    assert out[ROW["sumsq"]].tolist() == [2.0**-20] * 3
    assert out[ROW["l1"]].tolist() == out[ROW["max_abs"]].tolist() == [2.0**-10] * 3
    assert out[ROW["numel"]].tolist() == [1.0] * 3


def test_fail_on_nonfinite_under_grad_scaler_tolerates_calibration_not_real_nans(tmp_path: Path) -> None:
    calibrating = GradWatchCallback(fail_on="nonfinite")
    _trainer(tmp_path, calibrating, plugins=[_grad_scaler_plugin(2.0**30)]).fit(LitMLP())
    assert calibrating.watcher is not None and calibrating.watcher.history.nonfinite_steps > 0  # overflows were seen
    broken = GradWatchCallback(fail_on="nonfinite")
    with pytest.raises(GradientHealthError, match="loss scale fell to"):
        _trainer(tmp_path, broken, plugins=[_grad_scaler_plugin(2.0**2)], max_epochs=3).fit(LitMLP(nan_at_batch=2))


# -- loggers -------------------------------------------------------------------------------------------
def test_csv_logger_gets_per_layer_scalars(tmp_path: Path, lightning_messages: list[str]) -> None:
    callback = GradWatchCallback(activation_every_n_steps=2)
    logger = CSVLogger(str(tmp_path), name="csv")
    _trainer(tmp_path, callback, logger=logger, log_every_n_steps=2).fit(LitMLP())
    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    for column in ("grad_norm/net.0", "grad_norm/net.4", "grad_norm/total", "grad_to_weight/net.0", "dead_frac/net.1"):
        assert column in metrics.columns, column
    logged = metrics.dropna(subset=["grad_norm/net.0"])
    assert sorted(logged["step"].astype(int)) == [0, 2, 4, 6]
    np.testing.assert_allclose(logged["grad_norm/net.0"].to_numpy(), _grad_norms(callback).loc[[0, 2, 4, 6], "net.0"], rtol=1e-6)
    assert "gradwatch/healthy" in metrics.columns  # the final diagnosis
    skipped = [m for m in lightning_messages if "need a TensorBoardLogger" in m]
    assert len(skipped) == 1


def test_no_logger_runs_and_reports(tmp_path: Path, lightning_messages: list[str]) -> None:
    callback = GradWatchCallback()
    _trainer(tmp_path, callback, logger=False, max_epochs=2).fit(LitMLP(act=nn.Sigmoid, depth=6))
    assert callback.diagnosis is not None
    assert len(callback.to_dataframe())
    assert not list(tmp_path.rglob("*.csv")) and not list(tmp_path.rglob("events.out.tfevents*"))
    reports = [m for m in lightning_messages if m.startswith("gradwatch diagnosis")]
    assert any("end of fit" in m for m in reports)
    assert any("after epoch 0" in m for m in reports)


def test_healthy_run_reports_one_line_not_the_layer_table(tmp_path: Path, lightning_messages: list[str]) -> None:
    callback = GradWatchCallback()
    _trainer(tmp_path, callback, logger=False, max_epochs=2).fit(LitMLP())
    assert callback.diagnosis is not None and callback.diagnosis.healthy
    reports = [m for m in lightning_messages if m.startswith("gradwatch diagnosis")]
    assert reports and all(len(m.splitlines()) == 2 and m.rstrip().endswith("layers found") for m in reports), reports
    assert "grad_norm" in str(callback.diagnosis)  # the table is still there on request


# -- reporting and fail_on ---------------------------------------------------------------------------
def test_fail_on_nonfinite_stops_training_with_a_clear_message(tmp_path: Path) -> None:
    callback = GradWatchCallback(fail_on="nonfinite")
    trainer = _trainer(tmp_path, callback, max_epochs=3)
    with pytest.raises(GradientHealthError, match=r"stopped training at step 3: nonfinite") as info:
        trainer.fit(LitMLP(nan_at_batch=3))
    assert info.value.step == 3 and info.value.diagnosis is not None
    assert "nonfinite" in info.value.diagnosis.kinds()
    assert trainer.global_step == 3  # the poisoned step was not taken
    assert callback.watcher is not None and callback.watcher.closed  # hooks removed on the way out


def test_without_fail_on_nonfinite_is_reported_not_raised(tmp_path: Path) -> None:
    callback = GradWatchCallback()
    _trainer(tmp_path, callback).fit(LitMLP(nan_at_batch=5))
    assert callback.diagnosis is not None and "nonfinite" in callback.diagnosis.kinds()
    assert callback.diagnosis.by_kind("nonfinite")[0].evidence["first_step"] == 5  # global_step of the bad batch


# -- checkpoint / resume -----------------------------------------------------------------------------
def test_checkpoint_resume_continues_the_history(tmp_path: Path) -> None:
    first = GradWatchCallback()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _trainer(tmp_path, first, enable_checkpointing=True, callbacks=[first, ckpt], max_epochs=1).fit(LitMLP())
    before = first.to_dataframe()
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert isinstance(state, dict) and state["collected"] == 8 and state["calls"] == 8

    resumed = GradWatchCallback()
    trainer = _trainer(tmp_path, resumed, max_epochs=2)
    trainer.fit(LitMLP(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    after = resumed.to_dataframe()
    assert sorted(after.step.unique()) == list(range(16))  # 8 restored + 8 new, numbered by global_step
    assert resumed.watcher is not None and resumed.watcher.collected == 16
    assert resumed.watcher.history.total_steps == 16
    old = after[after.step < 8].set_index(["step", "layer", "metric"])["value"].sort_index()
    assert old.equals(before.set_index(["step", "layer", "metric"])["value"].sort_index())
    assert resumed.diagnosis is not None and resumed.diagnosis.steps is not None
    assert resumed.diagnosis.steps[1] == 15


def test_state_dict_is_plain_and_old_states_load_with_defaults(tmp_path: Path) -> None:
    callback = GradWatchCallback()
    callback.load_state_dict({})  # a checkpoint from before any state was saved
    _trainer(tmp_path, callback).fit(LitMLP())
    state = callback.state_dict()
    assert state["version"] == 1 and state["collected"] == 8 and isinstance(state["history"], dict)
    assert callback.state_key.startswith("GradWatchCallback")


# -- torch.compile -----------------------------------------------------------------------------------
class _InnerCompiled(LitMLP):
    def __init__(self) -> None:
        super().__init__(call_root=False)
        self.net = torch.compile(self.net, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["lightning_module", "submodule"])
def test_compiled_models_have_clean_names(tmp_path: Path, where: str, lightning_messages: list[str]) -> None:
    torch._dynamo.reset()
    callback = GradWatchCallback(activation_every_n_steps=2)
    model = torch.compile(LitMLP(), backend="aot_eager") if where == "lightning_module" else _InnerCompiled()
    _trainer(tmp_path, callback, max_steps=4).fit(model)
    assert callback.watcher is not None and callback.watcher.error is None
    layers = set(callback.to_dataframe().layer)
    assert layers == {"net.0", "net.2", "net.4", "(total)"}
    assert all(math.isfinite(v) for v in _grad_norms(callback).to_numpy().ravel())
    assert sum("activation statistics" in m for m in lightning_messages) == 1


# -- TensorBoard -------------------------------------------------------------------------------------
def test_tensorboard_logger_gets_everything_in_its_run_directory(tmp_path: Path) -> None:
    pytest.importorskip("gradwatch.tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = GradWatchCallback(histogram_every_n_steps=2, figure_every_n_steps=4, activation_every_n_steps=2)
    _trainer(tmp_path, callback, logger=logger, max_epochs=2).fit(LitMLP(act=nn.Tanh))
    run_dir = Path(logger.log_dir)
    assert [p.parent for p in tmp_path.rglob("events.out.tfevents*")] == [run_dir]  # one run directory, the logger's
    events = EventAccumulator(str(run_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()
    tags = events.Tags()
    scalars = set(tags["scalars"])
    for tag in ("grad_norm/00.net.0", "grad_norm/02.net.4", "grad_norm/total", "saturated_frac/00.net.1"):
        assert tag in scalars, (tag, sorted(scalars)[:20])
    steps = [e.step for e in events.Scalars("grad_norm/00.net.0")]
    assert steps == list(range(16))  # every collected step, numbered by global_step
    values = [e.value for e in events.Scalars("grad_norm/00.net.0")]
    np.testing.assert_allclose(values, _grad_norms(callback)["net.0"].to_numpy(), rtol=1e-6)
    assert [e.step for e in events.Histograms("grad_hist/00.net.0")] == list(range(0, 16, 2))
    assert "gradwatch/gradient_flow" in tags["images"]
    assert {"gradwatch/diagnosis/text_summary", "custom_scalars__config__", "gradwatch/meta"} <= set(tags["tensors"])


# -- the example -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lightning_quickstart_example_runs_fast(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lightning_quickstart", ROOT / "examples" / "lightning_quickstart.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    callback = example.main(["--fast", "--logdir", str(tmp_path / "runs")])
    assert callback.diagnosis is not None and "vanishing" in callback.diagnosis.kinds()
    assert list((tmp_path / "runs").rglob("events.out.tfevents*"))


# -- auto-fix pass-through ---------------------------------------------------------------------------
def test_auto_fix_is_passed_to_the_watcher_with_the_optimizer_unhooked(tmp_path: Path) -> None:
    callback = GradWatchCallback(auto_fix=("he_init",))
    trainer = _trainer(tmp_path, callback)
    trainer.fit(LitMLP())
    watcher = callback.watcher
    assert watcher is not None and watcher.error is None
    assert watcher.auto_fix == ("he_init",) and watcher.optimizer is trainer.optimizers[0]
    assert getattr(watcher, "autofixer", None) is not None
    assert list(_grad_norms(callback).index) == list(range(8))  # still collected by the callback, every step
    assert callback.auto_fix_events == []  # 8 steps < the probe window: nothing decided yet
