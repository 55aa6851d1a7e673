"""Property tests: per-layer gradient statistics and device histograms against brute force in float64.

Hypothesis draws layers of 1-3 parameters with arbitrary shapes (0-element, 1-element, scalar,
empty dimensions, and "big" tensors of 40,000 elements that take the CPU BLAS path), dtypes
float16/bfloat16/float32/float64, and values mixing ordinary numbers with denormals, huge values,
+-inf, NaN and zeros. The gradient a test sets is first cast to the parameter's dtype, and the
reference is computed from that cast tensor in float64.

Stated tolerances (``_close``):

- counts (``nonfinite``, ``grad_zero_frac``) and ``grad_max_abs`` are exact;
- ``grad_norm`` and ``grad_mean_abs`` are sums: relative error <= 1e-4 when accumulated in float32
  (float16/bfloat16/float32 gradients; the bound covers a 40,000-term BLAS sum), <= 1e-9 in float64;
  plus an absolute floor at the accumulator's subnormal resolution (float32: ``2**-149`` per element
  for the mean; float64: ``sqrt(n) * 2**-537`` for the norm, ``2**-1074`` per element for the mean);
- a layer whose gradients are tiny but non-zero never reads as "no gradient": ``grad_norm >=
  grad_max_abs`` (sums of squares that underflow float32 are recomputed in float64);
- a float64 statistic beyond float64's range (the norm of values above ~1e154) saturates to inf,
  and one beyond float32's range is stored as inf in the float32 history: never NaN;
- non-finite values never leak into the finite statistics: with NaN/Inf present every finite
  statistic still equals the reference over the finite values;
- histograms: every finite value is in exactly the bucket the binning defines (sign, exponent, 3
  mantissa bits of its float32 value; finite float64 values beyond float32's range in the top
  bucket), NaN/Inf/zero are counted apart, and no NaN/Inf reaches a histogram's numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import gradwatch
from gradwatch.collect import G, GradientCollector
from gradwatch.histograms import bin_on_device
from gradwatch.layers import discover_layers

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SPECIAL = (0.0, -0.0, 1.0, -2.0, 0.5, 1e-40, -1e-45, 5e-324, 1e-310, 6e-8, 1e-20, -1e-25, 65504.0, 1e5, 1e20,
           3e38, -1e39, 1e300, math.inf, -math.inf, math.nan)
BIG = 40_000  # >= the collector's 32K-element threshold: the CPU per-tensor BLAS path

PROFILE = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

values_st = st.lists(
    st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True, width=64),
              st.floats(min_value=-10, max_value=10)),
    min_size=1, max_size=12,
)
shape_st = st.one_of(
    st.sampled_from([(), (0,), (1,), (3, 0), (1, 1), (BIG,)]),
    st.lists(st.integers(0, 5), min_size=1, max_size=3).map(tuple),
)


@st.composite
def param_st(draw: st.DrawFn) -> torch.Tensor:
    """A gradient tensor: a drawn value pattern tiled to a drawn shape, cast to a drawn dtype."""
    shape = draw(shape_st)
    dtype = draw(st.sampled_from(DTYPES))
    pattern = torch.tensor(draw(values_st), dtype=torch.float64)
    n = math.prod(shape)
    flat = pattern.repeat(n // len(pattern) + 1)[:n]
    return flat.reshape(shape).to(dtype)


#: every device available here; with several, a model's layers are spread over them (one host copy per device)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
layers_st = st.lists(
    st.tuples(st.sampled_from(DEVICES), st.lists(param_st(), min_size=1, max_size=3)).map(
        lambda dg: [g.to(dg[0]) for g in dg[1]]),
    min_size=1, max_size=3,
)


class Holder(nn.Module):
    """One module per layer, each owning the drawn parameters (weights = ones, same dtype/shape)."""

    def __init__(self, grads: list[list[torch.Tensor]]):
        super().__init__()
        self.layers = nn.ModuleList()
        for group in grads:
            m = nn.Module()
            for j, g in enumerate(group):
                p = nn.Parameter(torch.ones(g.shape, dtype=g.dtype, device=g.device))
                p.grad = g.clone()
                m.register_parameter(f"p{j}", p)
            self.layers.append(m)


def reference(grads: list[torch.Tensor]) -> dict[str, float]:
    g = torch.cat([x.detach().cpu().to(torch.float64).reshape(-1) for x in grads])
    finite = g[torch.isfinite(g)]
    n = g.numel()
    return {
        "numel": n,
        "grad_norm": float(finite.norm()) if finite.numel() else 0.0,
        "grad_mean_abs": float(finite.abs().sum()) / n if n else math.nan,
        "grad_max_abs": float(finite.abs().max()) if finite.numel() else 0.0,
        "grad_zero_frac": float((g == 0).sum()) / n if n else math.nan,
        "nonfinite": float((~torch.isfinite(g)).sum()),
    }


def collect(model: nn.Module, slow: bool = True) -> np.ndarray:
    layers = discover_layers(model)
    c = GradientCollector(layers, track_updates=False)
    partials = c.compute_on_device(slow=slow)
    return c.finish(partials, [rows.cpu() for _, rows, _ in partials], slow=slow).values.numpy()


_SQRT_F64_MAX = math.sqrt(torch.finfo(torch.float64).max)


def _close(metric: str, got: float, ref: dict[str, float], wide: bool) -> bool:
    want = ref[metric]
    if ref["numel"] == 0:
        return math.isnan(got)  # a layer without elements has no statistics (not zero)
    if metric in ("nonfinite", "grad_zero_frac", "grad_max_abs"):
        return got == want
    if math.isinf(want) or (metric == "grad_norm" and want > _SQRT_F64_MAX):
        # finite float64 values whose sum (of squares) exceeds float64's range saturate to inf, never NaN
        return got == math.inf
    rel = 1e-9 if wide else 1e-4
    n = ref["numel"]
    if wide:
        floor = math.sqrt(n) * 2.0**-537 if metric == "grad_norm" else n * 2.0**-1074
    else:
        floor = 0.0 if metric == "grad_norm" else n * 2.0**-149
    return math.isfinite(got) and abs(got - want) <= rel * abs(want) + floor


def check_layers(grads: list[list[torch.Tensor]], values: np.ndarray) -> None:
    for i, group in enumerate(grads):
        ref = reference(group)
        wide = any(g.dtype == torch.float64 for g in group)
        for metric in ("grad_norm", "grad_mean_abs", "grad_max_abs", "grad_zero_frac", "nonfinite"):
            got = float(values[i, G[metric]])
            assert _close(metric, got, ref, wide), (i, metric, got, ref[metric], [(g.dtype, tuple(g.shape)) for g in group])
        if ref["numel"] and ref["grad_max_abs"] > (2.0**-511 if wide else 0.0):
            # tiny but non-zero gradients must never read as "no gradient"
            assert values[i, G["grad_norm"]] >= values[i, G["grad_max_abs"]] * (1 - 1e-6), (i, values[i])


@PROFILE
@given(layers_st)
@example([[torch.full((BIG,), 1e-30)]])                     # every square underflows float32
@example([[torch.full((5,), 1e-40), torch.tensor([3e38])]])  # denormals next to a huge value
@example([[torch.tensor([math.nan, 1.0, math.inf, -2.0, 0.0])]])
@example([[torch.zeros(0)], [torch.zeros(())]])
@example([[torch.zeros(0, dtype=torch.float16)], [torch.zeros(3, 0)]])  # no element anywhere: nothing to reduce
@example([[torch.full((BIG,), 2e19, dtype=torch.float32)]])  # finite values, overflowing sum of squares
def test_statistics_equal_float64_brute_force(grads: list[list[torch.Tensor]]) -> None:
    check_layers(grads, collect(Holder(grads)))


@PROFILE
@given(layers_st)
def test_fast_statistics_ignore_slow_ones_and_stay_exact(grads: list[list[torch.Tensor]]) -> None:
    """A step that is not on the slow cadence computes norms and non-finite counts only (others NaN)."""
    values = collect(Holder(grads), slow=False)
    for i, group in enumerate(grads):
        ref = reference(group)
        wide = any(g.dtype == torch.float64 for g in group)
        for metric in ("grad_norm", "nonfinite"):
            assert _close(metric, float(values[i, G[metric]]), ref, wide), (i, metric)
        for metric in ("grad_max_abs", "grad_mean_abs", "grad_zero_frac"):
            assert math.isnan(values[i, G[metric]]), (i, metric)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layers_st)
def test_the_watcher_records_the_same_statistics(grads: list[list[torch.Tensor]]) -> None:
    """End to end through ``watch().step()``: the history holds float32 values of the same statistics."""
    model = Holder(grads)
    with gradwatch.watch(model, activations=False, track_updates=False, slow_stats_every_n=1, on_error="raise") as w:
        w.step()
        v = w.history.view()
    assert v.total_steps == 1
    order = {name: i for i, name in enumerate(v.layers)}
    for i, group in enumerate(grads):
        ref = reference(group)
        row = v.grad[0, order[f"layers.{i}"]]
        for metric in ("grad_max_abs", "nonfinite", "grad_zero_frac", "grad_norm", "grad_mean_abs"):
            got, want = float(row[G[metric]]), ref[metric]
            if ref["numel"] == 0:
                assert math.isnan(got)
            elif np.isinf(np.float32(want)) or (metric == "grad_norm" and want > _SQRT_F64_MAX):
                assert got == math.inf  # beyond float32's range (the history is float32): inf, never NaN
            else:
                assert got == pytest.approx(float(np.float32(want)), rel=1e-4, abs=2.0**-149 * max(1, ref["numel"])), (metric, ref)
    # total norm: over finite values of every layer
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        total = float(np.sqrt(np.sum(np.square([reference(g)["grad_norm"] for g in grads], dtype=np.float64))))
    if not any(reference(g)["numel"] for g in grads):
        assert math.isnan(v.total_norm[0])  # nothing measured
    elif total < 3e38:
        assert v.total_norm[0] == pytest.approx(total, rel=1e-4, abs=1e-30)


# -- histograms --------------------------------------------------------------------------------------
def _ref_histogram_input(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().cpu().to(torch.float64).reshape(-1).numpy() for t in tensors]) if tensors else np.zeros(0)


def _bucket_of(v: float, limits: list[float]) -> int:
    """The histogram bucket holding ``v``: positive buckets are [lo, hi), negative ones (-hi, -lo]."""
    for i, lim in enumerate(limits):
        if (v < lim if v >= 0 else v <= lim) or i == len(limits) - 1:
            return i
    raise AssertionError("unreachable")


@PROFILE
@given(st.lists(param_st(), min_size=1, max_size=3), st.sampled_from(DEVICES))
@example([torch.tensor([math.nan, math.inf, -math.inf, 1.0, -1.0, 0.0, 2.0, -0.5])], "cpu")
@example([torch.tensor([1e300, -1e300, 1.0], dtype=torch.float64)], "cpu")  # finite, beyond float32's range
@example([torch.full((7,), math.nan)], "cpu")
def test_histograms_count_nonfinite_separately_and_bin_every_finite_value(tensors: list[torch.Tensor], device: str) -> None:
    tensors = [t.to(device) for t in tensors]
    (h,) = bin_on_device([tensors])
    x = _ref_histogram_input(tensors)
    if x.size == 0:
        assert h is None
        return
    nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
    finite = x[np.isfinite(x)]
    tiny = finite[np.abs(finite) < 2.0**-126]  # zeros and float32 subnormals share the zero bucket
    assert (h.numel, h.nan, h.inf, h.zeros) == (x.size, nan, inf, tiny.size)
    if not finite.size:
        assert h.values is None and h.log10_abs is None
        return
    hv = h.values
    assert hv is not None
    assert sum(hv.bucket_counts) == finite.size == hv.num
    for field in (hv.min, hv.max, hv.sum, hv.sum_squares, *hv.bucket_limits):
        assert math.isfinite(field), hv  # NaN/Inf never reach the histogram's numbers
    lo = float(np.float32(np.clip(finite.min(), -3.4028234663852886e38, 3.4028234663852886e38)))
    hi = float(np.float32(np.clip(finite.max(), -3.4028234663852886e38, 3.4028234663852886e38)))
    assert hv.min <= lo and hv.max >= hi
    if not nan and not inf:
        assert (hv.min, hv.max) == (lo, hi)
    assert all(a <= b for a, b in zip(hv.bucket_limits, hv.bucket_limits[1:], strict=False))
    counts = np.zeros(len(hv.bucket_limits))
    f32 = np.clip(finite, -3.4028234663852886e38, 3.4028234663852886e38).astype(np.float32).astype(np.float64)
    for v in f32:
        counts[_bucket_of(float(v), hv.bucket_limits)] += 1
    assert counts.tolist() == list(hv.bucket_counts)
    nonzero = finite.size - tiny.size
    if nonzero:
        assert h.log10_abs is not None and sum(h.log10_abs.bucket_counts) == nonzero
        assert all(math.isfinite(f) for f in (h.log10_abs.min, h.log10_abs.max, *h.log10_abs.bucket_limits))
    else:
        assert h.log10_abs is None
