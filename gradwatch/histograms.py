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
results are stacked on their device and copied to the host once per device -- on a CUDA device
without waiting for it (:func:`launch_bins`; counted with an atomic add, not ``bincount``, which
reads the keys' range on the host).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gradwatch.collect_plan import as_real_dense

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


_KEY_BUFFER_MAX = 1 << 22  # elements (16 MiB): larger tensors get a temporary of their own


def _keys(x: torch.Tensor, buffers: dict[torch.device, torch.Tensor] | None = None) -> torch.Tensor:
    """12-bit bucket keys of a contiguous 1-D float32 tensor: sign, exponent, 3 mantissa bits.

    With ``buffers`` the keys go into a buffer reused for every tensor of the step (each one is
    counted before the next is keyed): a fresh MiB-sized temporary per tensor costs page faults
    on CPU."""
    n = x.numel()
    if buffers is None or n > _KEY_BUFFER_MAX:
        return (x.view(torch.int32) >> 20).bitwise_and_(0xFFF)
    buf = buffers.get(x.device)
    if buf is None or buf.numel() < n:
        buf = buffers[x.device] = torch.empty(n, dtype=torch.int32, device=x.device)
    out = buf[:n]
    torch.bitwise_right_shift(x.view(torch.int32), 20, out=out)
    return out.bitwise_and_(0xFFF)


def _count(keys: torch.Tensor) -> torch.Tensor:
    if keys.device.type != "cuda":
        return torch.bincount(keys, minlength=N_KEYS)
    if torch.are_deterministic_algorithms_enabled():
        # no deterministic CUDA kernel for an atomic count (integer counts are order-independent
        # anyway, but torch refuses it): count through a sort instead, slower but allowed
        ordered = torch.sort(keys.reshape(-1).to(torch.int32)).values
        bounds = torch.searchsorted(ordered, torch.arange(N_KEYS + 1, device=keys.device, dtype=torch.int32))
        return bounds.diff()
    return count_keys_atomically(keys)


def count_keys_atomically(keys: torch.Tensor) -> torch.Tensor:
    """``bincount(keys, minlength=N_KEYS)`` as an add into ``N_KEYS`` counters: CUDA's ``bincount``
    reads the keys' min and max on the host to size its output (a device sync); the range is known."""
    ones = torch.ones(1, dtype=torch.int64, device=keys.device).expand(keys.numel())
    return torch.zeros(N_KEYS, dtype=torch.int64, device=keys.device).index_add_(0, keys.reshape(-1), ones)


def _as_float32_flat(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.layout != torch.strided or t.is_complex() or type(t) is not torch.Tensor:
        t = as_real_dense(t)
    if t.dtype == torch.float64:
        x = t.float()  # finite values beyond float32's range would become inf: saturate them instead
        over = torch.isinf(x) & torch.isfinite(t)
        return torch.where(over, torch.copysign(torch.full_like(x, _F32_MAX), x), x).reshape(-1)
    if t.dtype != torch.float32:
        t = t.float()
    return t.reshape(-1)


def _count_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class PendingHistograms:
    """Histograms binned on their devices whose copy to the host may still be in flight.

    On an accelerator the counts go to the host in a ``non_blocking`` copy into pinned memory with an
    event after it (a blocking copy would make the host wait for the device on every histogram step);
    :meth:`ready` asks the events without waiting, :meth:`result` waits for them and finishes on the
    host.
    """

    def __init__(self, n_groups: int) -> None:
        self.n_groups = n_groups
        #: per device: (host copy, event or None once complete, rows of the groups with elements there)
        self.copies: list[tuple[torch.Tensor, object | None, np.ndarray]] = []

    def ready(self) -> bool:
        """Every copy has completed (asked without waiting)."""
        return all(event is None or event.query() for _, event, _ in self.copies)  # type: ignore[attr-defined]

    def result(self) -> list[LayerHistograms | None]:
        """Per group its histograms, or ``None`` for a group without elements (waits for the copies)."""
        counts = np.zeros((self.n_groups, N_KEYS), dtype=np.float64)
        stats = np.zeros((self.n_groups, _STATS), dtype=np.float64)
        stats[:, 0], stats[:, 1] = math.inf, -math.inf
        present = np.zeros(self.n_groups, dtype=bool)
        for host_t, event, rows in self.copies:
            if event is not None:
                event.synchronize()  # type: ignore[attr-defined]
            host = host_t.numpy()
            counts[rows] += host[rows, :N_KEYS]
            stats[rows, 0] = np.minimum(stats[rows, 0], host[rows, N_KEYS])
            stats[rows, 1] = np.maximum(stats[rows, 1], host[rows, N_KEYS + 1])
            present[rows] = True
        return _finish_all(counts, stats, present)


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list as a long tensor on ``device`` without waiting for it (pinned, ``non_blocking``)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _to_host(t: torch.Tensor) -> tuple[torch.Tensor, object | None]:
    """``t`` copied to the host: at once on CPU; on a CUDA device into pinned memory, ``non_blocking``,
    with the event that tells when it is there."""
    if t.device.type != "cuda":
        return t.cpu(), None  # (on CPU the tensor itself)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


@torch.no_grad()
def launch_bins(groups: Sequence[Sequence[torch.Tensor]]) -> PendingHistograms:
    """Bin each group of tensors (e.g. one layer's gradients) on its device and start the copy of the
    counts to the host, one per device; :meth:`PendingHistograms.result` finishes them.

    Args:
        groups: per layer, the tensors to bin together (``None``-free; empty groups allowed). A group
            whose tensors live on several devices is binned per device and combined on the host.
    """
    # per device: (group of each tensor, per-group key counts accumulated in place, per-tensor min/max)
    per_device: dict[torch.device, tuple[list[int], torch.Tensor, list[torch.Tensor], dict[int, int]]] = {}
    buffers: dict[torch.device, torch.Tensor] = {}
    for gi, tensors in enumerate(groups):
        for t in tensors:
            if t.numel() == 0:
                continue
            x = _as_float32_flat(t)
            entry = per_device.get(x.device)
            if entry is None:
                entry = per_device[x.device] = (
                    [], torch.zeros(len(groups), N_KEYS, dtype=torch.int64, device=x.device), [], {})
            owners, dev_counts, minmax, rows_of = entry
            owners.append(gi)
            rows_of.setdefault(gi, len(rows_of))
            dev_counts[gi].add_(_count(_keys(x, buffers)))
            minmax.append(torch.stack(torch.aminmax(x)))
    pending = PendingHistograms(len(groups))
    for device, (owners, dev_counts, minmax, rows_of) in per_device.items():
        dtype = _count_dtype(device)
        local = _to_device(owners, device)
        s = torch.stack(minmax).to(dtype)
        lo = torch.full((len(groups),), math.inf, device=device, dtype=dtype).scatter_reduce_(0, local, s[:, 0], "amin")
        hi = torch.full((len(groups),), -math.inf, device=device, dtype=dtype).scatter_reduce_(0, local, s[:, 1], "amax")
        # one copy to the host: the counts (exact integers in float64 up to 2**53 elements) and min/max
        host, event = _to_host(torch.cat([dev_counts.to(dtype), lo[:, None], hi[:, None]], dim=1))
        pending.copies.append((host, event, np.array(sorted(rows_of))))
    return pending


def bin_on_device(groups: Sequence[Sequence[torch.Tensor]]) -> list[LayerHistograms | None]:
    """Bin each group of tensors (e.g. one layer's gradients) on its device; one host copy per device.

    Args:
        groups: per layer, the tensors to bin together (``None``-free; empty groups allowed).

    Returns:
        Per group its histograms, or ``None`` for a group without elements. A group whose tensors
        live on several devices is binned per device and combined on the host.
    """
    return launch_bins(groups).result()


# host side ---------------------------------------------------------------------------------------
# value buckets in ascending order: negative magnitudes (largest first), the zero bucket, positive
_ZERO_HI = float(_MAG_LO[0])  # the zero bucket holds |x| < 2**-126
_V_LEFT = np.concatenate([-_MAG_HI[::-1], [-_ZERO_HI], _MAG_LO])
_V_LIMIT = np.concatenate([-_MAG_LO[::-1], [_ZERO_HI], _MAG_HI])
_V_CENTER = np.concatenate([-(_MAG_LO + _MAG_HI)[::-1] / 2, [0.0], (_MAG_LO + _MAG_HI) / 2])
_L_LEFT, _L_LIMIT = _LOG_EDGES[:-1], _LOG_EDGES[1:]
_L_CENTER = (_L_LEFT + _L_LIMIT) / 2


def _finish_all(counts: np.ndarray, stats: np.ndarray, present: np.ndarray) -> list[LayerHistograms | None]:
    """Turn every group's key counts and min/max into TensorBoard histograms.

    Vectorised over the groups: a per-layer Python loop of a few dozen numpy calls cost ~130 us a
    layer, a large part of a histogram step at hundreds of layers."""
    pos, neg = counts[:, :_HALF], counts[:, _HALF:]
    zeros = pos[:, :_FIRST_NORMAL].sum(1) + neg[:, :_FIRST_NORMAL].sum(1)
    inf = pos[:, _INF_KEY] + neg[:, _INF_KEY]
    nan = pos[:, _INF_KEY + 1:].sum(1) + neg[:, _INF_KEY + 1:].sum(1)
    p, n = pos[:, _FIRST_NORMAL:_INF_KEY], neg[:, _FIRST_NORMAL:_INF_KEY]
    ascending = np.concatenate([n[:, ::-1], zeros[:, None], p], axis=1)
    mags = (p + n).reshape(len(counts), -1, _LOG_GROUP).sum(axis=2)
    numel = counts.sum(1)
    exact = present & (inf == 0) & (nan == 0)
    values = _histograms(ascending, _V_LEFT, _V_LIMIT, _V_CENTER, stats, exact, log10=False)
    logs = _histograms(mags, _L_LEFT, _L_LIMIT, _L_CENTER, stats, exact, log10=True)
    return [
        LayerHistograms(values=values[i], log10_abs=logs[i], numel=int(numel[i]), zeros=int(zeros[i]),
                        nan=int(nan[i]), inf=int(inf[i])) if present[i] else None
        for i in range(len(counts))
    ]


def _merge_runs(row: np.ndarray, lefts: np.ndarray, limits: np.ndarray, counts: np.ndarray,
                join: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge every bucket whose ``join`` flag is set into the bucket before it (counts add up)."""
    start = np.flatnonzero(~join)
    end = np.append(start[1:], len(counts)) - 1
    return row[start], lefts[start], limits[end], np.add.reduceat(counts, start)


def _histograms(counts: np.ndarray, left: np.ndarray, limit: np.ndarray, center: np.ndarray, stats: np.ndarray,
                exact: np.ndarray, log10: bool) -> list[HistogramData | None]:
    """Per row of ``counts`` (buckets ``[left, limit)``) its histogram over the non-empty range, with
    fewer buckets and the same counts: runs of empty buckets become one, and (value histograms)
    the buckets within ``2**-12`` of the range of zero -- far narrower than anything TensorBoard can
    draw -- become one. ``exact`` rows have exact ``stats`` (min, max) to use as the range."""
    out: list[HistogramData | None] = [None] * len(counts)
    nonempty = counts > 0
    rows = np.flatnonzero(nonempty.any(1))
    if not len(rows):
        return out
    lo = nonempty[rows].argmax(1)
    hi = counts.shape[1] - nonempty[rows, ::-1].argmax(1)  # one past the last non-empty bucket
    total, squares = counts[rows] @ center, counts[rows] @ (center * center)
    # every row's non-empty range, flattened: one pass of merges for all rows
    lengths = hi - lo
    first = np.zeros(int(lengths.sum()), dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    first[offsets] = True
    row = np.repeat(np.arange(len(rows)), lengths)
    col = np.arange(len(first)) - np.repeat(offsets - lo, lengths)
    c, le, li = counts[rows[row], col], left[col], limit[col]
    if not log10:
        span = np.maximum(np.abs(left[lo]), np.abs(limit[hi - 1]))
        small = np.maximum(np.abs(le), np.abs(li)) <= (span * _CENTRE_FRACTION)[row]
        join = small & np.concatenate([[False], small[:-1]]) & ~first
        first = first[~join]
        row, le, li, c = _merge_runs(row, le, li, c, join)
    empty = c == 0
    join = empty & np.concatenate([[False], empty[:-1]]) & ~first
    first = first[~join]
    row, le, li, c = _merge_runs(row, le, li, c, join)
    bounds = np.append(np.flatnonzero(first), len(c))
    limits_all, counts_all = li.tolist(), c.tolist()
    for k, r in enumerate(rows.tolist()):
        a, b = int(bounds[k]), int(bounds[k + 1])
        mn, mx = float(left[lo[k]]), float(limit[hi[k] - 1])
        if log10:
            if exact[r]:
                top = max(abs(float(stats[r, 0])), abs(float(stats[r, 1])))
                if top > 0 and math.isfinite(top):
                    mx = min(mx, max(float(left[hi[k] - 1]), math.log10(top)))
        elif exact[r]:
            mn, mx = float(stats[r, 0]), float(stats[r, 1])
        else:
            mn = 0.0 if mn == -_ZERO_HI else mn
            mx = 0.0 if mx == _ZERO_HI else mx
        limits = limits_all[a:b]
        limits[-1] = mx  # the last bucket ends at the maximum (TensorBoard reads it so anyway)
        bucket_counts = counts_all[a:b]
        out[r] = HistogramData(mn, mx, int(sum(bucket_counts)), float(total[k]), float(squares[k]), limits,
                               bucket_counts)
    return out


__all__ = ["HistogramData", "LayerHistograms", "N_KEYS", "PendingHistograms", "bin_on_device", "count_keys_atomically",
           "launch_bins"]
