"""Histograms of gradients binned on their own device, one host copy per histogram step.

``SummaryWriter.add_histogram`` copies every tensor to the host, bins it with numpy and writes
``min = max = nan`` if a single value is NaN. Here each value is binned by the bits of its float32
representation instead: sign (1 bit), exponent (8 bits) and the top 3 mantissa bits form a 12-bit
key, and one ``bincount`` per tensor counts the keys on the tensor's device. The 4096 counts give

- a histogram of the **values** with geometric buckets, 8 per power of two (neighbouring edges
  differ by at most 12.5 %; TensorFlow's own default histogram buckets use the same idea with a
  ratio of 1.1), mirrored for negative values, with a bucket for zero: a layer whose gradients
  are around 1e-9 is binned as finely as one whose gradients are around 1;
- a histogram of **log10|g|** with a fixed grid (4 buckets per power of two, ~13 per decade) that
  is the same for every layer and step, so vanishing shows as a shift to the left, layer by layer;
- exact counts of **zeros**, **NaN** and **Inf** (kept out of both histograms).

Float32 subnormals (|g| < 1.2e-38) are counted as zeros, and finite float64 values beyond float32's
range are binned as +-3.4e38 (the top bucket), never counted as Inf. The binning is exact at the bucket level
(bucket counts sum to the number of finite values); ``min``/``max`` are exact for tensors without
NaN/Inf (one ``aminmax``), else the outer bucket edges; ``sum``/``sum_squares`` are computed from
bucket midpoints (TensorBoard's histogram views do not use them; two more passes over every
gradient would). Per tensor the device does three passes (key, count, min/max); all layers'
results are stacked on their device and copied to the host once per device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gradwatch.collect import _as_real_dense

N_KEYS = 4096
_HALF = 2048            # keys >= 2048 have the sign bit set
_SUB = 8                # buckets per power of two (3 mantissa bits)
_FIRST_NORMAL = _SUB    # keys below have a zero exponent field: zeros and subnormals
_INF_KEY = 255 * _SUB   # exponent field 255: Inf (mantissa 0) and NaN
_STATS = 2              # min, max
_F32_MAX = float(torch.finfo(torch.float32).max)
_LOG_GROUP = 2          # log10|g| histogram: 8 / 2 = 4 buckets per power of two
_CENTRE_FRACTION = 2.0**-12  # value histogram: buckets this close to zero (relative to the range) are merged


def _lower_edges() -> np.ndarray:
    """Lower edge of the magnitude bucket of every positive key ``8 .. 2040`` (float64, exact)."""
    keys = np.arange(_FIRST_NORMAL, _INF_KEY + 1)
    exponent = (keys >> 3) - 127
    return np.ldexp(1.0 + (keys & 7) / _SUB, exponent)


_EDGES = _lower_edges()                     # _EDGES[k - 8] = lower edge of key k; last = 2**128
_MAG_LO = _EDGES[:-1]                       # per finite magnitude bucket (keys 8 .. 2039)
_MAG_HI = _EDGES[1:]
_LOG_EDGES = np.log10(_EDGES[::_LOG_GROUP])


@dataclass(frozen=True)
class HistogramData:
    """One histogram in TensorBoard's raw form (``SummaryWriter.add_histogram_raw`` arguments).

    ``bucket_limits[i]`` is the right edge of bucket ``i``; the first bucket starts at ``min``.
    """

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


@dataclass(frozen=True)
class LayerHistograms:
    """Histograms of one layer's tensors (all its parameters' gradients, or weights, together).

    Attributes:
        values: histogram of the finite values (geometric buckets, zero bucket), or ``None``
            when there is no finite value.
        log10_abs: histogram of log10|x| over the finite non-zero values, or ``None``.
        numel: number of elements binned.
        zeros, nan, inf: elements outside the log10 histogram.
    """

    values: HistogramData | None
    log10_abs: HistogramData | None
    numel: int
    zeros: int
    nan: int
    inf: int


def _keys(x: torch.Tensor) -> torch.Tensor:
    """12-bit bucket keys of a contiguous 1-D float32 tensor: sign, exponent, 3 mantissa bits."""
    return (x.view(torch.int32) >> 20).bitwise_and_(0xFFF)


def _count(keys: torch.Tensor) -> torch.Tensor:
    if keys.device.type == "cuda" and torch.are_deterministic_algorithms_enabled():
        # bincount has no deterministic CUDA kernel (integer counts are order-independent anyway,
        # but torch refuses it): count through a sort instead, slower but allowed.
        ordered = torch.sort(keys.reshape(-1).to(torch.int32)).values
        bounds = torch.searchsorted(ordered, torch.arange(N_KEYS + 1, device=keys.device, dtype=torch.int32))
        return bounds.diff()
    return torch.bincount(keys, minlength=N_KEYS)


def _as_float32_flat(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.layout != torch.strided or t.is_complex() or type(t) is not torch.Tensor:
        t = _as_real_dense(t)
    if t.dtype == torch.float64:
        x = t.float()  # finite values beyond float32's range would become inf: saturate them instead
        over = torch.isinf(x) & torch.isfinite(t)
        return torch.where(over, torch.copysign(torch.full_like(x, _F32_MAX), x), x).reshape(-1)
    if t.dtype != torch.float32:
        t = t.float()
    return t.reshape(-1)


def _count_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def bin_on_device(groups: Sequence[Sequence[torch.Tensor]]) -> list[LayerHistograms | None]:
    """Bin each group of tensors (e.g. one layer's gradients) on its device; one host copy per device.

    Args:
        groups: per layer, the tensors to bin together (``None``-free; empty groups allowed).

    Returns:
        Per group its histograms, or ``None`` for a group without elements. A group whose tensors
        live on several devices is binned per device and combined on the host.
    """
    per_device: dict[torch.device, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
    for gi, tensors in enumerate(groups):
        for t in tensors:
            if t.numel() == 0:
                continue
            x = _as_float32_flat(t)
            entry = per_device.setdefault(x.device, ([], [], []))
            entry[0].append(gi)
            entry[1].append(_count(_keys(x)))
            entry[2].append(torch.stack(torch.aminmax(x)))
    counts = np.zeros((len(groups), N_KEYS), dtype=np.float64)
    stats = np.zeros((len(groups), _STATS), dtype=np.float64)
    stats[:, 0], stats[:, 1] = math.inf, -math.inf
    present = np.zeros(len(groups), dtype=bool)
    for device, (owners, cnts, sts) in per_device.items():
        dtype = _count_dtype(device)
        uniq = sorted(set(owners))
        pos = {g: i for i, g in enumerate(uniq)}
        local = torch.tensor([pos[g] for g in owners], device=device, dtype=torch.long)
        c = torch.zeros(len(uniq), N_KEYS, device=device, dtype=dtype).index_add_(0, local, torch.stack(cnts).to(dtype))
        s = torch.stack(sts).to(dtype)
        lo = torch.full((len(uniq),), math.inf, device=device, dtype=dtype).scatter_reduce_(0, local, s[:, 0], "amin")
        hi = torch.full((len(uniq),), -math.inf, device=device, dtype=dtype).scatter_reduce_(0, local, s[:, 1], "amax")
        host = torch.cat([c, lo[:, None], hi[:, None]], dim=1).cpu().numpy().astype(np.float64)  # one copy
        rows = np.array(uniq)
        counts[rows] += host[:, :N_KEYS]
        stats[rows, 0] = np.minimum(stats[rows, 0], host[:, N_KEYS])
        stats[rows, 1] = np.maximum(stats[rows, 1], host[:, N_KEYS + 1])
        present[rows] = True
    return _finish_all(counts, stats, present)


# host side ---------------------------------------------------------------------------------------
# value buckets in ascending order: negative magnitudes (largest first), the zero bucket, positive
_ZERO_HI = float(_MAG_LO[0])  # the zero bucket holds |x| < 2**-126
_V_LEFT = np.concatenate([-_MAG_HI[::-1], [-_ZERO_HI], _MAG_LO])
_V_LIMIT = np.concatenate([-_MAG_LO[::-1], [_ZERO_HI], _MAG_HI])
_V_CENTER = np.concatenate([-(_MAG_LO + _MAG_HI)[::-1] / 2, [0.0], (_MAG_LO + _MAG_HI) / 2])
_L_LEFT, _L_LIMIT = _LOG_EDGES[:-1], _LOG_EDGES[1:]
_L_CENTER = (_L_LEFT + _L_LIMIT) / 2


def _finish_all(counts: np.ndarray, stats: np.ndarray, present: np.ndarray) -> list[LayerHistograms | None]:
    """Turn every group's key counts and min/max into TensorBoard histograms (vectorised where it can)."""
    pos, neg = counts[:, :_HALF], counts[:, _HALF:]
    zeros = pos[:, :_FIRST_NORMAL].sum(1) + neg[:, :_FIRST_NORMAL].sum(1)
    inf = pos[:, _INF_KEY] + neg[:, _INF_KEY]
    nan = pos[:, _INF_KEY + 1:].sum(1) + neg[:, _INF_KEY + 1:].sum(1)
    p, n = pos[:, _FIRST_NORMAL:_INF_KEY], neg[:, _FIRST_NORMAL:_INF_KEY]
    ascending = np.concatenate([n[:, ::-1], zeros[:, None], p], axis=1)
    mags = (p + n).reshape(len(counts), -1, _LOG_GROUP).sum(axis=2)
    numel = counts.sum(1)
    out: list[LayerHistograms | None] = []
    for i in range(len(counts)):
        if not present[i]:
            out.append(None)
            continue
        exact = inf[i] == 0 and nan[i] == 0
        out.append(LayerHistograms(
            values=_values_histogram(ascending[i], stats[i] if exact else None),
            log10_abs=_log10_histogram(mags[i], stats[i] if exact else None),
            numel=int(numel[i]), zeros=int(zeros[i]), nan=int(nan[i]), inf=int(inf[i]),
        ))
    return out


def _merge(lefts: np.ndarray, limits: np.ndarray, counts: np.ndarray, join: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge every bucket whose ``join`` flag is set into the bucket before it (counts add up)."""
    start = np.flatnonzero(~join)
    end = np.append(start[1:], len(counts)) - 1
    return lefts[start], limits[end], np.add.reduceat(counts, start)


def _compact(lefts: np.ndarray, limits: np.ndarray, counts: np.ndarray, centre: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fewer buckets, same counts: runs of empty buckets become one; with ``centre > 0`` the buckets
    within ``centre`` of zero (far narrower than anything TensorBoard can draw) become one."""
    if centre > 0:
        small = np.maximum(np.abs(lefts), np.abs(limits)) <= centre
        join = small & np.concatenate([[False], small[:-1]])
        lefts, limits, counts = _merge(lefts, limits, counts, join)
    empty = counts == 0
    join = empty & np.concatenate([[False], empty[:-1]])
    return _merge(lefts, limits, counts, join)


def _nonempty(counts: np.ndarray) -> slice | None:
    nz = np.flatnonzero(counts)
    return slice(nz[0], nz[-1] + 1) if len(nz) else None


def _values_histogram(ascending: np.ndarray, stats: np.ndarray | None) -> HistogramData | None:
    sl = _nonempty(ascending)
    if sl is None:
        return None
    counts, lefts, limits = ascending[sl], _V_LEFT[sl], _V_LIMIT[sl]
    centers = _V_CENTER[sl]
    total, squares = float(centers @ counts), float((centers * centers) @ counts)
    if stats is not None:
        mn, mx = float(stats[0]), float(stats[1])
    else:
        mn = float(lefts[0]) if lefts[0] != -_ZERO_HI else 0.0
        mx = float(limits[-1]) if limits[-1] != _ZERO_HI else 0.0
    span = max(abs(float(lefts[0])), abs(float(limits[-1])))
    lefts, limits, counts = _compact(lefts, limits, counts, centre=span * _CENTRE_FRACTION)
    limits = limits.copy()
    limits[-1] = mx  # the last bucket ends at the maximum (TensorBoard reads it so anyway)
    return HistogramData(mn, mx, int(counts.sum()), total, squares, limits.tolist(), counts.tolist())


def _log10_histogram(mags: np.ndarray, stats: np.ndarray | None) -> HistogramData | None:
    sl = _nonempty(mags)
    if sl is None:
        return None
    counts, lefts, limits, centers = mags[sl], _L_LEFT[sl], _L_LIMIT[sl], _L_CENTER[sl]
    total, squares = float(centers @ counts), float((centers * centers) @ counts)
    mn, mx = float(lefts[0]), float(limits[-1])
    if stats is not None:
        top = max(abs(float(stats[0])), abs(float(stats[1])))
        if top > 0 and math.isfinite(top):
            mx = min(mx, max(float(lefts[-1]), math.log10(top)))
    lefts, limits, counts = _compact(lefts, limits, counts)
    limits = limits.copy()
    limits[-1] = mx
    return HistogramData(mn, mx, int(counts.sum()), total, squares, limits.tolist(), counts.tolist())


__all__ = ["HistogramData", "LayerHistograms", "N_KEYS", "bin_on_device"]
