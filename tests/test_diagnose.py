"""Diagnosis rules on synthetic histories: no model, exact control over the numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch import Diagnosis, Finding, Thresholds, diagnose
from gradwatch.activations import ACT_METRICS, LAYER_SIGNAL_METRICS
from gradwatch.collect import GRAD_METRICS
from gradwatch.history import ActivationMeta, HistoryView, LayerMeta

M = {m: i for i, m in enumerate(GRAD_METRICS)}


def view(
    gtw: list[float],
    steps: int = 30,
    weight_rms_he: float = 1.0,
    noise: float = 0.1,
    total_norm: np.ndarray | None = None,
    types: list[str] | None = None,
    context: dict | None = None,
    acts: list[tuple[str, str, bool, float, float]] | None = None,
    act_rms: list[float] | None = None,
    fan_in: int = 64,
) -> HistoryView:
    """Layers l0..lN with a grad-to-weight profile (depth order), log-normal noise across steps.

    ``acts``: (name, kind, is_output, dead_frac, saturated_frac) per activation module.
    """
    rng = np.random.default_rng(0)
    n = len(gtw)
    numel = fan_in * fan_in
    w = weight_rms_he * math.sqrt(2.0 / fan_in) * math.sqrt(numel)
    grad = np.full((steps, n, len(GRAD_METRICS)), np.nan, dtype=np.float32)
    ratio = np.array(gtw)[None, :] * 10 ** (noise * rng.standard_normal((steps, n)))
    grad[:, :, M["grad_to_weight"]] = ratio
    grad[:, :, M["grad_norm"]] = ratio * w
    grad[:, :, M["weight_norm"]] = w
    grad[:, :, M["nonfinite"]] = 0
    tn = total_norm if total_norm is not None else np.sqrt(np.nansum(grad[:, :, M["grad_norm"]] ** 2, axis=1))
    acts = acts or []
    s_steps = np.arange(0, steps, 10)
    act = np.zeros((len(s_steps), len(acts), len(ACT_METRICS)), dtype=np.float32)
    for i, (_, kind, _, dead, sat) in enumerate(acts):
        act[:, i] = [dead if kind == "relu" else np.nan, sat, 64.0]
    signal = np.full((len(s_steps), n, len(LAYER_SIGNAL_METRICS)), np.nan, dtype=np.float32)
    if act_rms is not None:
        signal[:, :, 0] = act_rms
    return HistoryView(
        layers=[f"l{i}" for i in range(n)],
        layer_meta=[LayerMeta(type_name=(types or ["Linear"] * n)[i], depth=i, fan_in=fan_in, numel=numel) for i in range(n)],
        steps=np.arange(steps),
        grad=grad,
        total_norm=tn.astype(np.float64),
        loss=np.full(steps, np.nan),
        activations=[a[0] for a in acts],
        activation_meta=[ActivationMeta(kind=a[1], depth=i, feeding_layer=f"l{i}", is_output=a[2]) for i, a in enumerate(acts)],
        sample_steps=s_steps if acts or act_rms is not None else np.zeros(0, dtype=np.int64),
        act=act if acts else np.zeros((0, 0, len(ACT_METRICS)), np.float32),
        signal=signal if act_rms is not None else np.zeros((0, n, len(LAYER_SIGNAL_METRICS)), np.float32),
        total_steps=steps,
        context=context or {},
    )


def decaying(n: int, decades: float, top: float = 0.05) -> list[float]:
    return [top * 10 ** (-decades * (n - 1 - i) / (n - 1)) for i in range(n)]


# -- vanishing ---------------------------------------------------------------------------------
def test_decay_across_depth_is_vanishing_naming_early_layers_first() -> None:
    d = diagnose(view(decaying(10, 8.0)))
    (f,) = d.by_kind("vanishing")
    assert f.layers[0] == "l0" and "l9" not in f.layers
    assert f.severity == "critical"
    assert 5.0 < f.evidence["decades"] < 8.0
    assert "clip_gradients" not in f.fixes


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e3])
def test_vanishing_is_scale_invariant(scale: float) -> None:
    healthy = diagnose(view([0.01 * scale] * 10))
    assert healthy.healthy or healthy.kinds() == {"exploding"} and scale >= 1e3
    sick = diagnose(view([g * scale for g in decaying(10, 6.0)]))
    assert "vanishing" in sick.kinds()


@pytest.mark.parametrize("decades,expected", [(2.6, False), (3.4, True)])
def test_vanishing_threshold_boundary(decades: float, expected: bool) -> None:
    # early-quarter vs late-quarter medians differ by a known amount: a step function profile
    profile = [0.01 * 10 ** -decades] * 3 + [0.01] * 9
    d = diagnose(view(profile, noise=0.0))
    assert ("vanishing" in d.kinds()) is expected


def test_one_odd_layer_is_not_a_decay_trend() -> None:
    profile = [0.01] * 10
    profile[0] = 1e-7  # one layer, e.g. a nearly-unused input projection
    d = diagnose(view(profile, noise=0.0), Thresholds(min_rank_correlation=0.5))
    # the first quarter median is the odd layer and its neighbour: not a trend across depth
    assert "vanishing" not in d.kinds()


def test_zero_and_missing_gradients_are_no_gradient_not_vanishing() -> None:
    v = view([0.01] * 8)
    v.grad[:, :3, M["grad_norm"]] = 0.0
    v.grad[:, :3, M["grad_to_weight"]] = 0.0
    v.grad[:, 3:5, :] = np.nan
    d = diagnose(v)
    assert "vanishing" not in d.kinds()
    assert any("no gradient" in n for n in d.notes)


def test_transient_decay_is_not_sustained() -> None:
    v = view([0.01] * 10)
    sick = view(decaying(10, 6.0))
    v.grad[:5] = sick.grad[:5]  # only 5 of 30 steps
    assert "vanishing" not in diagnose(v).kinds()


def test_embeddings_and_norm_layers_are_not_compared_with_matrices() -> None:
    types = ["Embedding"] + ["Linear"] * 8
    profile = [1e-7] + [0.01] * 8
    assert "vanishing" not in diagnose(view(profile, types=types, noise=0.0)).kinds()


def test_vanishing_fixes_follow_the_cause() -> None:
    sat = [("a0", "sigmoid", False, 0.0, 0.1), ("a1", "sigmoid", True, 0.0, 0.99)]
    f = diagnose(view(decaying(10, 6.0), acts=sat)).by_kind("vanishing")[0]
    assert f.fixes[:2] == ("insert_batchnorm", "swap_activation") and f.evidence["activations"] == ["a0"]
    rnn = diagnose(view(decaying(6, 6.0), types=["RNN"] * 6)).by_kind("vanishing")[0]
    assert rnn.fixes[0] == "lstm_gru"
    tiny = diagnose(view(decaying(10, 6.0), weight_rms_he=0.05)).by_kind("vanishing")[0]
    assert tiny.fixes[0] == "he_init"
    assert all(fix != "clip_gradients" for fs in (f, rnn, tiny) for fix in fs.fixes)


# -- exploding ---------------------------------------------------------------------------------
def test_flat_but_huge_gradients_are_exploding_and_blame_the_init_under_adam() -> None:
    d = diagnose(view([200.0] * 8, weight_rms_he=3.0, context={"optimizer_scale_invariant": True}))
    (f,) = d.by_kind("exploding")
    assert f.fixes[0] == "he_init" and "clip_gradients" not in f.fixes
    assert "vanishing" not in d.kinds()


def test_exploding_under_sgd_may_clip_after_the_cause() -> None:
    f = diagnose(view([200.0] * 8, weight_rms_he=3.0, context={"optimizer_scale_invariant": False})).by_kind("exploding")[0]
    assert f.fixes.index("he_init") < f.fixes.index("clip_gradients")


@pytest.mark.parametrize("ratio,expected", [(5.0, False), (20.0, True)])
def test_grad_to_weight_boundary(ratio: float, expected: bool) -> None:
    assert ("exploding" in diagnose(view([ratio] * 6, noise=0.0)).kinds()) is expected


def test_near_zero_initialised_layers_are_not_exploding() -> None:
    assert "exploding" not in diagnose(view([500.0] * 6, weight_rms_he=0.01)).kinds()


def test_growth_over_steps_is_exploding() -> None:
    tn = 10 ** np.linspace(0, 4, 30)
    f = diagnose(view([0.01] * 6, total_norm=tn)).by_kind("exploding")
    assert f and f[0].severity == "critical" and f[0].evidence["growth_over_steps_decades"] > 2


def test_forward_signal_growing_with_depth_is_exploding() -> None:
    d = diagnose(view([0.01] * 8, act_rms=[10.0 ** i for i in range(8)]))
    assert "exploding" in d.kinds()
    assert "exploding" not in diagnose(view([0.01] * 8, act_rms=[1.0] * 8)).kinds()


# -- non-finite ---------------------------------------------------------------------------------
def test_nonfinite_names_first_step_and_layers() -> None:
    v = view([0.01] * 4)
    v.grad[7:, 2, M["nonfinite"]] = 3
    v.first_nonfinite = (7, ["l2"])
    v.nonfinite_steps = 23
    (f,) = diagnose(v).by_kind("nonfinite")
    assert f.evidence["first_step"] == 7 and f.layers == ("l2",) and f.severity == "critical"


def test_isolated_inf_under_fp16_loss_scaling_is_calibration() -> None:
    v = view([0.01] * 4, steps=60, context={"amp_loss_scaling": True})
    v.grad[3, 1, M["nonfinite"]] = 1
    v.first_nonfinite = (3, ["l1"])
    v.nonfinite_steps = 1
    assert "nonfinite" not in diagnose(v).kinds()
    v.context = {}
    assert "nonfinite" in diagnose(v).kinds()


# -- activations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dead,expected", [(0.3, None), (0.6, "warning"), (0.95, "critical")])
def test_dead_units_boundaries(dead: float, expected: str | None) -> None:
    d = diagnose(view([0.01] * 4, acts=[("r0", "relu", False, dead, np.nan)]))
    got = d.by_kind("dead_units")
    assert (got[0].severity if got else None) == expected
    if got:
        assert got[0].layers == ("r0",) and got[0].evidence["feeding_layers"] == ["l0"]


def test_leaky_units_never_die_and_few_samples_are_not_evidence() -> None:
    assert diagnose(view([0.01] * 4, acts=[("r0", "leaky", False, 0.99, np.nan)])).healthy
    v = view([0.01] * 4, acts=[("r0", "relu", False, 0.99, np.nan)])
    v.act[:, :, 2] = 2.0  # each unit judged on 2 values only
    assert "dead_units" not in diagnose(v).kinds()


@pytest.mark.parametrize("sat,expected", [(0.3, False), (0.7, True)])
def test_saturation_boundary_and_output_activation_is_exempt(sat: float, expected: bool) -> None:
    d = diagnose(view([0.01] * 4, acts=[("s0", "sigmoid", False, 0.0, sat), ("out", "sigmoid", True, 0.0, 0.99)]))
    found = d.by_kind("saturation")
    assert bool(found) is expected
    assert all("out" not in f.layers for f in found)


# -- totality and contract --------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["empty", "one_step", "one_layer", "all_nan", "constant", "many_layers", "inf"])
def test_diagnosis_is_total(case: str) -> None:
    if case == "empty":
        v = view([0.01] * 3, steps=0)
    elif case == "one_step":
        v = view([0.01] * 3, steps=1)
    elif case == "one_layer":
        v = view([0.01], steps=20)
    elif case == "many_layers":
        v = view(decaying(2000, 8.0), steps=6)
    else:
        v = view([0.01] * 5)
        v.grad[:] = np.nan if case == "all_nan" else (1.0 if case == "constant" else np.inf)
    d = diagnose(v)
    assert isinstance(d, Diagnosis)
    assert isinstance(str(d), str)


def test_report_is_readable_and_thresholds_are_overridable() -> None:
    v = view(decaying(10, 6.0))
    d = diagnose(v)
    text = str(d)
    assert "vanishing" in text and "fix 1: swap_activation" not in text and "l0" in text
    assert diagnose(v, Thresholds(vanishing_decades=8.0)).healthy
    with pytest.raises(ValueError, match="persistence"):
        Thresholds(persistence=2.0)
    with pytest.raises(TypeError, match="unknown threshold"):
        Thresholds().updated(vanishing=1.0)


def test_finding_validates_kind_and_fix_names() -> None:
    with pytest.raises(ValueError, match="kind"):
        Finding(kind="slow", layers=(), severity="warning", message="")
    with pytest.raises(ValueError, match="unknown fix"):
        Finding(kind="vanishing", layers=(), severity="warning", message="", fixes=("magic",))


def test_one_jump_at_the_head_is_not_a_decay_across_depth() -> None:
    # a classifier head initialised near zero has a huge grad-to-weight ratio: one jump, not a trend
    profile = [0.01] * 9 + [100.0]
    assert "vanishing" not in diagnose(view(profile, noise=0.05)).kinds()


def test_cause_before_symptom_in_fix_ranking() -> None:
    sat = [("a0", "tanh", False, 0.0, 0.0)]
    tiny_tanh = diagnose(view(decaying(10, 6.0), weight_rms_he=0.05, acts=sat)).by_kind("vanishing")[0]
    assert tiny_tanh.fixes[0] == "he_init"  # tiny weights are the cause, not the (unsaturated) tanh
    big = diagnose(view([0.01] * 4, weight_rms_he=3.0, acts=[("s0", "sigmoid", False, 0.0, 0.9)])).by_kind("saturation")[0]
    assert big.fixes[0] == "he_init"
    ok = diagnose(view([0.01] * 4, acts=[("s0", "sigmoid", False, 0.0, 0.9)])).by_kind("saturation")[0]
    assert ok.fixes[0] == "swap_activation"
    rnn = diagnose(view([200.0] * 3, weight_rms_he=3.0, types=["RNN"] * 3, context={"optimizer_scale_invariant": False}))
    assert rnn.by_kind("exploding")[0].fixes[0] == "clip_gradients"


def test_an_early_explosion_that_silenced_a_layer_stays_visible() -> None:
    v = view([0.01] * 4, steps=30)
    v.grad[:, 1, M["grad_norm"]] = 0.0  # layer l1 has had no gradient since
    v.grad[:, 1, M["grad_to_weight"]] = 0.0
    v.peak_grad_to_weight = np.array([0.02, 5e3, 0.02, 0.02])
    v.peak_step = np.array([3, 0, 5, 5])
    (f,) = diagnose(v).by_kind("exploding")
    assert f.layers == ("l1",) and f.severity == "critical"
    assert f.evidence["early_explosion"]["l1"]["step"] == 0
    v.peak_grad_to_weight = np.array([0.02, 50.0, 0.02, 0.02])  # below the critical ratio: no finding
    assert "exploding" not in diagnose(v).kinds()


def test_loss_scale_calibration_overflows_are_not_a_finding_but_persistent_ones_are() -> None:
    v = view([0.01] * 4, steps=24, context={"amp_loss_scaling": True})
    v.grad[:13, 1, M["nonfinite"]] = 5  # the scaler halves its scale 13 times, then settles
    v.first_nonfinite = (0, ["l1"])
    v.nonfinite_steps = 13
    assert "nonfinite" not in diagnose(v).kinds()
    v.grad[-3:, 1, M["nonfinite"]] = 5  # overflowing again and again: skipped steps, no training
    assert "nonfinite" in diagnose(v).kinds()


def test_a_forgetting_rnn_that_learns_its_task_is_a_note_not_a_finding() -> None:
    v = view([0.01] * 3, types=["RNN", "Linear", "Linear"], act_rms=[1.0] * 3)
    v.signal[:, 0, 2] = 6.0  # the gradient reaching the first time steps is 1e-6 of the last
    assert diagnose(v).by_kind("vanishing")[0].fixes == ("lstm_gru",)  # no loss known: reported
    v.initial_loss = 0.69
    v.loss = np.full(len(v.steps), 0.68)  # stuck at chance: reported
    assert "vanishing" in diagnose(v).kinds()
    v.loss = np.full(len(v.steps), 0.05)  # learnt the task: only a note
    d = diagnose(v)
    assert "vanishing" not in d.kinds() and any("loss fell" in n for n in d.notes)


def test_one_update_larger_than_the_weights_is_an_explosion_even_long_ago() -> None:
    v = view([0.01] * 4, steps=30)
    v.peak_grad_to_weight = np.array([0.02, 300.0, 0.02, 0.02])  # below the critical ratio...
    v.peak_step = np.zeros(4, dtype=np.int64)
    v.peak_update_ratio = np.array([1e-3, 26.0, 1e-3, 1e-3])  # ...but one step moved l1 26x its size
    v.peak_update_step = np.array([1, 1, 1, 1])
    (f,) = diagnose(v).by_kind("exploding")
    assert f.layers == ("l1",) and f.evidence["early_explosion"]["l1"]["value"] == 26.0
    v.peak_update_ratio = np.array([1e-3, 0.05, 1e-3, 1e-3])  # clipped: the update stayed small
    assert "exploding" not in diagnose(v).kinds()
    v.peak_update_ratio = None  # no update measured: the gradient peak times an SGD learning rate
    v.context = {"optimizer_scale_invariant": False, "lr": 0.1}
    assert "exploding" in diagnose(v).kinds()
    v.context = {"optimizer_scale_invariant": True, "lr": 0.1}  # Adam: a large gradient is not a large step
    assert "exploding" not in diagnose(v).kinds()


@pytest.mark.parametrize("seed", range(6))
def test_per_step_decay_matches_depth_decay_step_by_step(seed: int) -> None:
    """The vectorised per-step rule decides exactly as ``depth_decay`` applied to each step."""
    from gradwatch.diagnose_depth import depth_decay, per_step_decay

    rng = np.random.default_rng(seed)
    steps, layers = 80, 3 + seed * 3
    trend = np.linspace(-rng.uniform(0, 8), 0, layers) * (-1) ** seed  # decays and growths
    logs = trend + rng.normal(0, 1.5, (steps, layers))
    logs[rng.random((steps, layers)) < 0.1 * (seed % 3)] = np.nan  # a few patterns of missing layers
    logs[rng.integers(0, steps, 3), :] = np.nan                      # steps without any data
    for sign in (1.0, -1.0):
        for min_layers in (0, 2, 4):
            want = []
            for t in range(steps):
                r = depth_decay(sign * logs[t], min_layers)
                want.append(r is not None and r[0] >= 3.0 and r[1] >= 0.5)
            got = per_step_decay(logs, min_layers, 3.0, 0.5, sign=sign)
            assert got.tolist() == want


def test_a_zero_initialised_bias_only_layer_is_not_exploding() -> None:
    # a layer owning only an offset (like BERT's ``cls.predictions`` bias) starts at zero: its
    # grad-to-weight ratio is large by construction, not a sign of explosion (a healthy run)
    import torch
    from torch import nn

    import gradwatch

    class Offset(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.bias

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10), Offset(10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(256, 16), torch.randint(0, 10, (256,))
    with gradwatch.watch(model, slow_stats_every_n=1, activations=False) as w:
        for t in range(60):
            i = (t * 32) % 256
            loss = nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            loss.backward()
            w.step(loss)
            opt.step()
            opt.zero_grad()
        diag = w.diagnose()
    assert not diag.by_kind("exploding"), diag
    assert "3" in set(w.to_dataframe()["layer"])  # the offset layer was watched (and judged)


def test_the_reasons_printed_are_the_fixes_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # the diagnosis keeps no table of reasons: each fix class's `why` is the one source
    from gradwatch.fixes.registry import get_fix_class

    monkeypatch.setitem(get_fix_class("residual").why, "vanishing", "a reason {acts} only the class knows")
    sat = [("a0", "sigmoid", False, 0.0, 0.1), ("a1", "sigmoid", True, 0.0, 0.99)]
    (f,) = diagnose(view(decaying(10, 6.0), acts=sat)).by_kind("vanishing")
    assert f.reasons[f.fixes.index("residual")] == "a reason a0 only the class knows"


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_nanmedian_is_numpys_on_nan_inf_and_empty_slices(dtype: type) -> None:
    """The diagnosis' one-sort median agrees with ``np.nanmedian`` exactly (value, shape, dtype),
    all-NaN and empty slices included, without numpy's all-NaN warning."""
    import warnings

    from gradwatch.diagnose_depth import nanmedian

    rng = np.random.default_rng(1)
    for _ in range(300):
        shape = tuple(int(s) for s in rng.integers(0, 5, size=int(rng.integers(1, 4))))
        a = (rng.standard_normal(shape) * 5).astype(dtype)
        if a.dtype.kind == "f":
            u = rng.random(shape)
            a[u < 0.3] = np.nan
            a[u > 0.95] = np.inf
            a[(u > 0.9) & (u <= 0.95)] = -np.inf
        for axis in [None, *range(-a.ndim, a.ndim)]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                expected = np.nanmedian(a, axis=axis)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = nanmedian(a, axis=axis)
            assert np.shape(got) == np.shape(expected)
            assert np.asarray(got).dtype == np.asarray(expected).dtype
            np.testing.assert_array_equal(got, expected)
    huge = np.array([[np.finfo(np.float32).max] * 2], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nanmedian(huge, axis=1)[0] == np.inf  # numpy's value too, without an overflow warning
