"""The diagnosis is total, and every rule decides on the right side of each of its thresholds.

Totality: hypothesis builds arbitrary (shape-consistent) ``HistoryView``s -- no steps, one step, one
layer, no layers, thousands of layers, all-NaN, constant, +-inf, negative and zero values, odd layer
metadata, activations feeding layers that do not exist, random thresholds -- and ``diagnose()``
must return a valid ``Diagnosis`` whose rules all ran (no "rule ... failed" note: a rule that
crashes is a finding lost, even if the crash is caught), whose findings name known layers, and which
renders and serialises. The same holds for views rebuilt from arbitrary long-format frames (what
``gradwatch report`` feeds the rules from logs).

Boundaries: each threshold of ``Thresholds`` that a rule uses is tested just below and just above
(those in ``tests/test_diagnose.py`` are not repeated).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gradwatch import Diagnosis, Thresholds, diagnose
from gradwatch.activations import ACT_METRICS, LAYER_SIGNAL_METRICS
from gradwatch.collect import GRAD_METRICS
from gradwatch.findings import FINDING_KINDS, FIX_NAMES
from gradwatch.history import ActivationMeta, HistoryView, LayerMeta

M = {m: i for i, m in enumerate(GRAD_METRICS)}
PROFILE = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FILLS = ("normal", "lognormal", "nan", "constant", "inf", "neg", "zero", "mixed", "huge", "tiny")
TYPES = ("Linear", "Conv2d", "Embedding", "RNN", "LSTM", "GRU", "LayerNorm", "BatchNorm1d", "", "Weird")
KINDS = ("relu", "leaky", "sigmoid", "tanh", "hard", "", "unknown")


def _fill(rng: np.random.Generator, how: str, shape: tuple[int, ...]) -> np.ndarray:
    if how == "normal":
        return rng.standard_normal(shape)
    if how == "lognormal":
        return 10.0 ** rng.uniform(-30, 30, shape)
    if how == "nan":
        return np.full(shape, np.nan)
    if how == "constant":
        return np.full(shape, 0.37)
    if how == "inf":
        return np.where(rng.random(shape) < 0.5, np.inf, -np.inf)
    if how == "neg":
        return -np.abs(rng.standard_normal(shape))
    if how == "zero":
        return np.zeros(shape)
    if how == "huge":
        return np.full(shape, 3e38)
    if how == "tiny":
        return np.full(shape, 1e-44)
    pick = rng.integers(0, 6, shape)  # mixed
    return np.choose(pick, [rng.standard_normal(shape), np.full(shape, np.nan), np.full(shape, np.inf),
                            np.zeros(shape), 10.0 ** rng.uniform(-40, 38, shape), np.full(shape, -1.0)])


@st.composite
def views(draw: st.DrawFn, max_layers: int = 6) -> HistoryView:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(0, max_layers))
    t = draw(st.integers(0, 40))
    s = draw(st.integers(0, 6))
    n_act = draw(st.integers(0, 4))
    layers = [f"l{i}" for i in range(n)]
    meta = [LayerMeta(type_name=draw(st.sampled_from(TYPES)), depth=i,
                      fan_in=draw(st.sampled_from([None, 0, 1, 64])), numel=draw(st.sampled_from([0, 1, 4096])),
                      recurrent=draw(st.booleans())) for i in range(n)]
    grad = np.empty((t, n, len(GRAD_METRICS)), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for m in range(len(GRAD_METRICS)):
            grad[:, :, m] = _fill(rng, draw(st.sampled_from(FILLS)), (t, n))
        # the non-finite count is a count (float32 history: NaN = not measured), never negative or inf
        counts = draw(st.sampled_from(["zero", "nan", "counts"]))
        grad[:, :, M["nonfinite"]] = (0.0 if counts == "zero" else np.nan if counts == "nan"
                                      else rng.integers(0, 3, (t, n)) * rng.choice([1, 10**6], (t, n)))
        total_norm = _fill(rng, draw(st.sampled_from(FILLS)), (t,))
        loss = _fill(rng, draw(st.sampled_from(FILLS)), (t,))
        act = _fill(rng, draw(st.sampled_from(FILLS)), (s, n_act, len(ACT_METRICS))).astype(np.float32)
        signal = _fill(rng, draw(st.sampled_from(FILLS)), (s, n, len(LAYER_SIGNAL_METRICS))).astype(np.float32)
    acts = [f"a{i}" for i in range(n_act)]
    ameta = [ActivationMeta(kind=draw(st.sampled_from(KINDS)), type_name="X", depth=i,
                            feeding_layer=draw(st.sampled_from([None, "missing", *layers[:2]])),
                            is_output=draw(st.booleans())) for i in range(n_act)]
    steps = np.sort(rng.choice(10 * t + 1, size=t, replace=False)).astype(np.int64) if t else np.zeros(0, np.int64)
    first_nf = draw(st.sampled_from([None, (0, []), (3, layers[:1]), (5, ["gone"])]))
    peak = None
    if draw(st.booleans()) and n:
        peak = _fill(rng, draw(st.sampled_from(FILLS)), (n,))
    context = draw(st.sampled_from([{}, {"amp_loss_scaling": True}, {"optimizer_scale_invariant": True},
                                    {"optimizer_scale_invariant": False, "amp_loss_scaling": False}]))
    return HistoryView(
        layers=layers, layer_meta=meta, steps=steps, grad=grad, total_norm=total_norm, loss=loss,
        activations=acts, activation_meta=ameta,
        sample_steps=np.sort(rng.integers(0, 10 * t + 1, s)).astype(np.int64), act=act, signal=signal,
        first_nonfinite=first_nf, nonfinite_steps=draw(st.integers(0, t + 1)), total_steps=draw(st.integers(0, 10 * t + 1)),
        context=context, peak_grad_to_weight=peak,
        peak_step=None if peak is None else rng.integers(0, 100, n),
    )


thresholds_st = st.one_of(
    st.just(Thresholds()),
    st.builds(
        Thresholds,
        window=st.integers(1, 60), min_steps=st.integers(1, 10), persistence=st.floats(0, 1),
        min_depth_layers=st.integers(0, 5), vanishing_decades=st.floats(0, 10), vanishing_critical_decades=st.floats(0, 10),
        min_rank_correlation=st.floats(0, 1), exploding_grad_to_weight=st.floats(0, 1e4),
        exploding_depth_decades=st.floats(0, 5), exploding_growth_decades=st.floats(0, 5),
        forward_growth_decades=st.floats(0, 5), dead_frac=st.floats(0, 1), saturated_frac=st.floats(0, 1),
        dead_min_samples=st.integers(0, 32),
    ),
)


def check_valid(d: Diagnosis, v: HistoryView) -> None:
    assert isinstance(d, Diagnosis)
    failed = [n for n in d.notes if "failed" in n]
    assert not failed, failed
    known = set(v.layers) | set(v.activations)
    for f in d.findings:
        assert f.kind in FINDING_KINDS and f.severity in ("warning", "critical")
        assert set(f.fixes) <= set(FIX_NAMES)
        assert set(f.layers) <= known or f.kind == "nonfinite", (f.kind, f.layers)
    assert [r.name for r in d.layers] == list(v.layers)
    assert isinstance(str(d), str)
    json.dumps(d.to_dict(), default=str)


def _many_layers() -> HistoryView:
    rng = np.random.default_rng(1)
    n, t = 3000, 8
    grad = (10.0 ** rng.uniform(-12, 1, (t, n, len(GRAD_METRICS)))).astype(np.float32)
    return HistoryView(layers=[f"l{i}" for i in range(n)],
                       layer_meta=[LayerMeta("Linear", i, 64, 4096) for i in range(n)], steps=np.arange(t),
                       grad=grad, total_norm=np.ones(t), loss=np.ones(t), total_steps=t)


def _empty() -> HistoryView:
    return HistoryView(layers=[], layer_meta=[], steps=np.zeros(0, np.int64),
                       grad=np.zeros((0, 0, len(GRAD_METRICS)), np.float32), total_norm=np.zeros(0), loss=np.zeros(0))


@PROFILE
@given(views(), thresholds_st)
@example(_empty(), Thresholds())
@example(_many_layers(), Thresholds())
@example(_many_layers(), Thresholds(min_depth_layers=0, min_steps=1))
def test_diagnosis_is_total_on_arbitrary_histories(v: HistoryView, th: Thresholds) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak into the user's log either (numpy RuntimeWarnings)
        d = diagnose(v, th)
    check_valid(d, v)


_frames = st.lists(
    st.tuples(
        st.integers(-3, 50),
        st.sampled_from(["l0", "l1", "l2", "(total)", "a0", ""]),
        st.sampled_from([*GRAD_METRICS, *ACT_METRICS, *LAYER_SIGNAL_METRICS, "loss", "bogus"]),
        st.floats(allow_nan=True, allow_infinity=True, width=32),
    ),
    max_size=80,
)


@PROFILE
@given(_frames, st.booleans())
def test_views_rebuilt_from_arbitrary_log_frames_diagnose_without_error(rows: list, with_depth: bool) -> None:
    df = pd.DataFrame(rows, columns=["step", "layer", "metric", "value"])
    if with_depth:
        df["depth"] = df["layer"].map({"l0": 0, "l1": 1, "l2": 2, "(total)": -1, "a0": 3, "": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = HistoryView.from_dataframe(df)
        d = diagnose(v)
    check_valid(d, v)


# -- boundaries ----------------------------------------------------------------------------------------
def view(gtw: list[float], steps: int = 30, weight_rms_he: float = 1.0, total_norm: np.ndarray | None = None,
         types: list[str] | None = None, context: dict | None = None, fan_in: int = 64) -> HistoryView:
    """Layers l0..lN with an exact grad-to-weight profile (depth order), the same at every step."""
    n = len(gtw)
    numel = fan_in * fan_in
    w = weight_rms_he * math.sqrt(2.0 / fan_in) * math.sqrt(numel)
    grad = np.full((steps, n, len(GRAD_METRICS)), np.nan, dtype=np.float32)
    grad[:, :, M["grad_to_weight"]] = np.array(gtw)[None, :]
    grad[:, :, M["grad_norm"]] = np.array(gtw)[None, :] * w
    grad[:, :, M["weight_norm"]] = w
    grad[:, :, M["nonfinite"]] = 0
    tn = total_norm if total_norm is not None else np.sqrt(np.nansum(grad[:, :, M["grad_norm"]] ** 2, axis=1))
    return HistoryView(
        layers=[f"l{i}" for i in range(n)],
        layer_meta=[LayerMeta(type_name=(types or ["Linear"] * n)[i], depth=i, fan_in=fan_in, numel=numel) for i in range(n)],
        steps=np.arange(steps), grad=grad, total_norm=tn.astype(np.float64), loss=np.full(steps, np.nan),
        total_steps=steps, context=context or {},
    )


def with_signal(v: HistoryView, samples: int, act_rms: list[float] | None = None,
                out_grad: list[float] | None = None, time_decay: list[float] | None = None) -> HistoryView:
    n = len(v.layers)
    sig = np.full((samples, n, len(LAYER_SIGNAL_METRICS)), np.nan, dtype=np.float32)
    for k, vals in enumerate((act_rms, out_grad, time_decay)):
        if vals is not None:
            sig[:, :, k] = vals
    v.sample_steps = np.arange(samples, dtype=np.int64) * max(1, len(v.steps) // max(1, samples))
    v.signal = sig
    v.act = np.zeros((samples, 0, len(ACT_METRICS)), np.float32)
    return v


def with_acts(v: HistoryView, kind: str, dead: float, sat: float, unit_samples: float = 64.0) -> HistoryView:
    v = with_signal(v, 3)
    v.activations = ["a0", "out"]
    v.activation_meta = [ActivationMeta(kind=kind, depth=0, feeding_layer="l0"),
                         ActivationMeta(kind="sigmoid", depth=1, feeding_layer=v.layers[-1], is_output=True)]
    v.act = np.array([[[dead, sat, unit_samples], [0.0, 0.0, 64.0]]] * 3, dtype=np.float32)
    return v


def step_profile(decades: float, n: int = 12, top: float = 0.01) -> list[float]:
    """First quarter ``decades`` below the rest: a decay whose size the rules read exactly."""
    q = n // 4
    return [top * 10 ** -decades] * q + [top] * (n - q)


def kinds(v: HistoryView, **th: float) -> set[str]:
    return diagnose(v, Thresholds(**th)).kinds()


@pytest.mark.parametrize(("decades", "severity"), [(4.8, "warning"), (5.2, "critical")])
def test_vanishing_critical_boundary(decades: float, severity: str) -> None:
    (f,) = diagnose(view(step_profile(decades))).by_kind("vanishing")
    assert f.severity == severity


@pytest.mark.parametrize(("holding", "expected"), [(17, False), (19, True)])  # 17/30 = 0.57 < 0.6 <= 19/30
def test_persistence_boundary(holding: int, expected: bool) -> None:
    v = view([0.01] * 12)
    sick = view(step_profile(4.0))
    v.grad[-holding:] = sick.grad[-holding:]
    assert ("vanishing" in kinds(v)) is expected


@pytest.mark.parametrize(("steps", "expected"), [(4, False), (5, True)])
def test_min_steps_boundary(steps: int, expected: bool) -> None:
    d = diagnose(view(step_profile(4.0), steps=steps))
    assert ("vanishing" in d.kinds()) is expected
    assert any("trend rules wait" in n for n in d.notes) is (not expected)


@pytest.mark.parametrize(("layers", "expected"), [(2, False), (3, True)])
def test_min_depth_layers_boundary(layers: int, expected: bool) -> None:
    assert ("vanishing" in kinds(view([1e-6] + [0.01] * (layers - 1)), min_rank_correlation=0.0)) is expected


@pytest.mark.parametrize(("rho", "expected"), [(0.80, True), (0.90, False)])
def test_min_rank_correlation_boundary(rho: float, expected: bool) -> None:
    # a 6-decade decay, two layers swapped: 3.8 decades between the quarters, rank correlation 0.855
    profile = [10.0 ** (-6 + 6 * i / 11) for i in range(12)]
    profile[2], profile[6] = profile[6], profile[2]
    assert ("vanishing" in kinds(view(profile), min_rank_correlation=rho)) is expected


@pytest.mark.parametrize(("decades", "expected"), [(2.9, False), (3.1, True)])
def test_vanishing_by_backward_signal_boundary(decades: float, expected: bool) -> None:
    # no usable grad-to-weight (norm layers only), but dL/d(output) decays across depth
    v = with_signal(view([0.01] * 12, types=["LayerNorm"] * 12), 5, out_grad=step_profile(decades))
    for m in v.layer_meta:
        m.fan_in = None
    assert ("vanishing" in kinds(v)) is expected


@pytest.mark.parametrize(("decades", "expected"), [(2.9, False), (3.1, True)])
def test_vanishing_through_time_boundary(decades: float, expected: bool) -> None:
    v = with_signal(view([0.01] * 3, types=["Linear", "RNN", "Linear"]), 4, time_decay=[math.nan, decades, math.nan])
    found = diagnose(v).by_kind("vanishing")
    assert bool(found) is expected
    if found:
        assert found[0].layers == ("l1",) and found[0].fixes == ("lstm_gru",)


@pytest.mark.parametrize(("ratio", "expected"), [(9.5, None), (10.5, "warning"), (990.0, "warning"), (1010.0, "critical")])
def test_grad_to_weight_ratio_and_critical_boundaries(ratio: float, expected: str | None) -> None:
    got = diagnose(view([ratio] * 6)).by_kind("exploding")
    assert (got[0].severity if got else None) == expected


@pytest.mark.parametrize(("he", "expected"), [(0.065, False), (0.075, True)])  # small_weight_factor / sqrt(2) = 0.0707
def test_small_weight_factor_boundary(he: float, expected: bool) -> None:
    assert ("exploding" in kinds(view([50.0] * 6, weight_rms_he=he))) is expected


@pytest.mark.parametrize(("he", "first_fix"), [(1.9, "clip_gradients"), (2.1, "he_init")])
def test_over_scaled_init_boundary_decides_the_cause(he: float, first_fix: str) -> None:
    (f,) = diagnose(view([50.0] * 6, weight_rms_he=he, context={"optimizer_scale_invariant": False})).by_kind("exploding")
    assert f.fixes[0] == first_fix


@pytest.mark.parametrize(("decades", "expected"), [(2.8, False), (3.2, True)])
def test_growth_towards_the_input_boundary(decades: float, expected: bool) -> None:
    profile = [1e-5 * 10**decades] * 3 + [1e-5] * 9  # ratios far below 10: only the depth-growth rule can fire
    f = diagnose(view(profile)).by_kind("exploding")
    assert bool(f) is expected
    if f:
        assert f[0].evidence["depth_growth_decades"] == pytest.approx(decades, abs=0.01) and f[0].layers[0] == "l0"


@pytest.mark.parametrize(("decades", "expected"), [(1.9, False), (2.1, True)])
def test_growth_over_steps_boundary(decades: float, expected: bool) -> None:
    # quarter medians of a log-linear ramp differ by ~ (3/4 + 1/4 / 2) of its span; tune the span so the
    # measured growth is just below / above exploding_growth_decades
    tn = 10 ** np.concatenate([np.zeros(8), np.linspace(0, decades, 14), np.full(8, decades)])
    assert ("exploding" in kinds(view([0.01] * 6, total_norm=tn))) is expected


@pytest.mark.parametrize(("decades", "expected"), [(2.9, False), (3.1, True)])
def test_forward_signal_growth_boundary(decades: float, expected: bool) -> None:
    v = with_signal(view([0.01] * 8), 4, act_rms=[1.0] * 2 + [10.0**decades] * 6)
    assert ("exploding" in kinds(v)) is expected


@pytest.mark.parametrize(("peak", "expected"), [(990.0, False), (1010.0, True)])
def test_run_long_peak_ratio_boundary(peak: float, expected: bool) -> None:
    v = view([0.01] * 4)
    v.peak_grad_to_weight = np.array([0.02, peak, 0.02, 0.02])
    v.peak_step = np.array([1, 2, 3, 4])
    assert ("exploding" in kinds(v)) is expected


@pytest.mark.parametrize(("recent", "expected"), [(1, False), (2, True)])  # of the latest four steps
def test_fp16_loss_scaling_nonfinite_boundary(recent: int, expected: bool) -> None:
    v = view([0.01] * 4, context={"amp_loss_scaling": True})
    v.grad[-recent:, 2, M["nonfinite"]] = 4
    v.first_nonfinite = (int(v.steps[-recent]), ["l2"])
    v.nonfinite_steps = recent
    assert ("nonfinite" in kinds(v)) is expected


@pytest.mark.parametrize(("dead", "samples", "expected"),
                         [(0.49, 64, None), (0.51, 64, "warning"), (0.89, 64, "warning"), (0.91, 64, "critical"),
                          (0.95, 15, None), (0.95, 16, "critical")])
def test_dead_units_fraction_critical_and_min_samples_boundaries(dead: float, samples: float, expected: str | None) -> None:
    got = diagnose(with_acts(view([0.01] * 4), "relu", dead, 0.0, unit_samples=samples)).by_kind("dead_units")
    assert (got[0].severity if got else None) == expected


@pytest.mark.parametrize(("sat", "expected"), [(0.49, None), (0.51, "warning"), (0.89, "warning"), (0.91, "critical")])
def test_saturation_fraction_and_critical_boundaries(sat: float, expected: str | None) -> None:
    got = diagnose(with_acts(view([0.01] * 4), "tanh", math.nan, sat)).by_kind("saturation")
    assert (got[0].severity if got else None) == expected
