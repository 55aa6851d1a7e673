"""The spike rule: synthetic histories for its boundaries and false-alarm behaviour, real tiny runs for the
rest (healthy runs stay silent; a bad batch is found; clipping and the opt-in skip act on it)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import diagnose, models
from gradwatch.collect import GRAD_METRICS
from gradwatch.fixes.clipping import GradientClipper
from gradwatch.history import HistoryView, LayerMeta

N = GRAD_METRICS.index("grad_norm")


def synthetic(seed: int, layers: int = 20, steps: int = 250, window: int = 50, noise: float = 0.1,
              spike: tuple[int, list[int], float] | None = None, scale: float = 1.0) -> HistoryView:
    """Log-normal per-layer gradient norms (``noise`` decades), optionally one spike ``(step, layers, factor)``;
    the last ``window`` steps are the window, the rest the lookback."""
    rng = np.random.default_rng(seed)
    logs = rng.standard_normal((steps, layers)) * noise + rng.normal(0, 0.2, layers)
    norms = scale * 10 ** logs
    loss = 1.0 + 0.05 * rng.standard_normal(steps)
    if spike is not None:
        step, which, factor = spike
        norms[step, which] *= factor
        loss[step + 2] = 5.0
    grad = np.full((steps, layers, len(GRAD_METRICS)), np.nan, dtype=np.float32)
    grad[:, :, N] = norms
    grad[:, :, GRAD_METRICS.index("nonfinite")] = 0
    total = np.sqrt((norms ** 2).sum(axis=1))
    w = slice(steps - window, steps)
    p = slice(0, steps - window)
    return HistoryView(
        layers=[f"l{i}" for i in range(layers)], layer_meta=[LayerMeta(depth=i) for i in range(layers)],
        steps=np.arange(steps)[w], grad=grad[w], total_norm=total[w], loss=loss[w],
        pre_steps=np.arange(steps)[p], pre_grad_norm=grad[p, :, N], pre_total_norm=total[p], pre_loss=loss[p],
        total_steps=steps,
    )


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("noise", [0.1, 0.25])
def test_ordinary_log_normal_noise_never_alarms(seed: int, noise: float) -> None:
    assert "spike" not in diagnose(synthetic(seed, noise=noise)).kinds()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_a_spike_is_found_with_its_first_step_layers_and_the_loss_that_followed(seed: int, scale: float) -> None:
    d = diagnose(synthetic(seed, spike=(230, [3, 17], 40.0), scale=scale))
    (f,) = d.by_kind("spike")  # scale-free: the same finding whatever the loss scale
    assert f.evidence["first_step"] == 230
    assert f.evidence["first_layers"] == ["l3", "l17"]
    assert f.evidence["loss_followed_at"] == 232
    assert f.severity == "critical" and f.fixes[0] == "clip_gradients"


@pytest.mark.parametrize(("factor", "expected"), [(5.0, False), (40.0, True)])
def test_the_ratio_condition_holds_even_when_the_deviation_is_many_mads(factor: float, expected: bool) -> None:
    # noise of 0.02 decades: a 5x jump is ~30 robust deviations but under the 10x ratio
    v = synthetic(0, noise=0.02, spike=(230, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], factor))
    assert ("spike" in diagnose(v).kinds()) is expected


def test_a_spike_before_the_window_is_counted_but_is_no_finding_by_itself() -> None:
    v = synthetic(0, spike=(120, [3, 17], 40.0))
    assert "spike" not in diagnose(v).kinds()
    both = synthetic(0, spike=(230, [3, 17], 40.0))
    both.pre_grad_norm[120, [3, 17]] *= 40
    both.pre_total_norm[120] = np.sqrt((both.pre_grad_norm[120].astype(float) ** 2).sum())
    (f,) = diagnose(both).by_kind("spike")
    assert f.evidence["first_step"] == 120 and f.evidence["n_spike_steps"] == 2


def test_a_small_layer_alone_is_not_a_spike_when_the_total_norm_does_not_move() -> None:
    v = synthetic(0, spike=(230, [0], 40.0))
    v.grad[:, 0, N] *= 1e-4  # a tiny, rarely used layer
    v.pre_grad_norm[:, 0] *= 1e-4
    v.total_norm[:] = np.sqrt((v.grad[:, :, N].astype(float) ** 2).sum(axis=1))
    assert "spike" not in diagnose(v).kinds()


# -- real runs ------------------------------------------------------------------------------------
def _mlp(seed: int, adam: bool, warmup: bool = False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 20, generator=g)
    y = (x @ torch.randn(20, 5, generator=g)).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if adam else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100)) if warmup else None

    def batch(t: int):
        i = (t * 16) % 4096
        return x[i:i + 16], y[i:i + 16], nn.functional.cross_entropy
    return model, opt, batch, sched


def _reference(name: str, seed: int):
    case = models.create(name, seed)
    return case.model, case.make_optimizer(), (lambda t: (*case.batch(t), case.loss_fn)), None


def _run(model, opt, batch, sched, steps: int = 300, bad_batch: int | None = None, every: int = 50):
    """Train; diagnose every ``every`` steps; returns the diagnoses. ``bad_batch``: that step's batch is an
    outlier (inputs x10, labels shifted), the way one corrupt shard hits a run."""
    diagnoses = []
    with gradwatch.watch(model, optimizer=opt, activations=False, diagnose_every_n_steps=0) as w:
        for t in range(steps):
            x, y, loss_fn = batch(t)
            if t == bad_batch:
                x, y = x * 10, (y + 1) % 5
            loss = loss_fn(model(x), y)
            loss.backward()
            w.step(loss)
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()
            if (t + 1) % every == 0:
                diagnoses.append(w.diagnose())
    return diagnoses


HEALTHY = {
    "sgd_mlp": lambda s: _mlp(s, adam=False),
    "adam_mlp_warmup": lambda s: _mlp(s, adam=True, warmup=True),
    "transformer_preln": lambda s: _reference("transformer_preln", s),
    "resnet_bn": lambda s: _reference("resnet_bn", s),
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_runs_stay_silent(name: str) -> None:
    torch.set_num_threads(1)
    for diag in _run(*HEALTHY[name](0)):
        assert "spike" not in diag.kinds(), f"{name}: {diag}"


@pytest.mark.parametrize("seed", [0, 1])
def test_a_bad_batch_is_a_spike_and_the_fixes_act_on_it(seed: int, caplog: pytest.LogCaptureFixture) -> None:
    torch.set_num_threads(1)
    diagnoses = _run(*_mlp(seed, adam=True), steps=250, bad_batch=230)
    assert all("spike" not in d.kinds() for d in diagnoses[:-1])
    (f,) = diagnoses[-1].by_kind("spike")
    assert f.evidence["first_step"] == 230 and f.evidence["clip_threshold"] > 0

    # recommended: clipping at the run's own robust bound (not the unit default); the skip is opt-in
    model, opt, batch, _ = _mlp(seed, adam=True)
    report = gradwatch.apply_fixes(model, diagnoses[-1], optimizer=opt)
    assert [c.fix for c in report.applied] == ["clip_gradients"]
    (clipper,) = report.clippers
    assert isinstance(clipper, GradientClipper) and clipper.threshold == pytest.approx(f.evidence["clip_threshold"])
    clipper.remove()

    model, opt, batch, _ = _mlp(seed, adam=True)
    report = gradwatch.apply_fixes(model, diagnoses[-1], optimizer=opt, only=["skip_spikes"])
    (skipper,) = report.clippers
    caplog.set_level(logging.WARNING)
    for t in range(250):
        x, y, loss_fn = batch(t)
        if t == 230:
            x, y = x * 10, (y + 1) % 5
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert [s["call"] for s in skipper.skipped] == [230]
    # the skipped step left Adam's state alone: every parameter saw one step fewer
    assert all(int(opt.state[p]["step"]) == 249 for p in model.parameters())
    # one warning for the one skip (the INFO line announcing the applied fix is not a skip)
    assert sum(r.levelno >= logging.WARNING and "skip_spikes" in r.getMessage() for r in caplog.records) == 1
    skipper.remove()


def test_a_clipper_dropping_nan_gradients_logs_once_then_counts(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = GradientClipper("norm", max_norm=1.0).attach(opt)
    caplog.set_level(logging.WARNING)
    for _ in range(200):
        (model(torch.full((2, 4), float("nan"))).sum()).backward()
        opt.step()
        opt.zero_grad()
    lines = [r.getMessage() for r in caplog.records if "non-finite gradient norm" in r.getMessage()]
    assert len(lines) == 3 and "100 times" in lines[-1]  # the 1st, 10th and 100th of 200
    assert clipper.skipped_steps == 200
    clipper.remove()
