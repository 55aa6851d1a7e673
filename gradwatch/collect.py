"""Batched per-layer gradient statistics: one pass of fused ops, one host copy per step.

The statistics of every layer are computed with ``torch._foreach_*`` reductions over all
gradients at once, scattered into per-layer rows on the gradients' device, stacked into one
small tensor and copied to the host once. Nothing here loops over layers in Python on the hot
path; the only Python loop is over parameters to read ``.grad`` (an attribute read each).

Non-finite values do not poison the finite statistics: a non-finite value makes its layer's
sum of squares non-finite, which is how it is detected for free; only then (a rare, already
broken step) a slow path counts the non-finite values and recomputes that layer's statistics
over its finite values in float64, at the cost of extra host syncs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradwatch.layers import LayerInfo

#: Per-layer gradient metrics, in the column order of the history's gradient table.
GRAD_METRICS: tuple[str, ...] = (
    "grad_norm",        # L2 norm of the layer's gradients (finite values)
    "grad_mean_abs",    # mean |g| over the layer's elements that have a gradient
    "grad_max_abs",     # max |g| (finite values)
    "grad_zero_frac",   # fraction of exactly-zero gradient elements (on the slow-stat cadence)
    "nonfinite",        # count of NaN/Inf gradient elements
    "weight_norm",      # L2 norm of the layer's parameters (on the slow-stat cadence)
    "grad_to_weight",   # grad_norm / weight_norm (latest weight norm)
    "update_ratio",     # ||w_{t+1} - w_t|| / ||w_t|| of one optimizer step (slow-stat cadence)
)
G = {name: i for i, name in enumerate(GRAD_METRICS)}

# Rows of the on-device result tensor.
_SUMSQ, _L1, _MAX, _NUMEL, _ZEROS, _WSUMSQ, _DSQ, _SNAPSQ = range(8)
_N_ROWS = 8


@dataclass
class StepStats:
    """Host-side statistics of one collected step: ``values[layer, metric]`` in GRAD_METRICS order."""

    values: torch.Tensor  # float64, (n_layers, len(GRAD_METRICS)); NaN = not measured / no gradient
    total_norm: float
    nonfinite_layers: list[int]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` held by this process: the local shard of a DTensor (FSDP2), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _as_real_dense(g: torch.Tensor) -> torch.Tensor:
    g = _local(g)  # DTensor shard (FSDP2): statistics of the local shard
    if g.layout != torch.strided:
        g = g.coalesce().values() if g.is_sparse else g.to_dense()
    if g.is_complex():
        g = g.abs()
    return g


class GradientCollector:
    """Computes per-layer gradient statistics for a fixed list of layers.

    Args:
        layers: the layers, in the order their rows should appear (depth order).
        track_updates: on slow-stat steps keep a copy of the weights (one extra parameter-sized
            buffer until the next collected step) to measure the update-to-weight ratio.
    """

    def __init__(self, layers: Sequence[LayerInfo], track_updates: bool = True):
        self.layers = list(layers)
        self.params: list[torch.nn.Parameter] = [p for layer in self.layers for p in layer.params]
        owner = [i for i, layer in enumerate(self.layers) for _ in layer.params]
        self._owner = owner
        self._numel = [_local(p).numel() for p in self.params]  # local shard (reduced across ranks)
        self._index_cache: dict[tuple[torch.device, tuple[int, ...] | None], torch.Tensor] = {}
        self._last_weight_norm = torch.full((len(self.layers),), math.nan, dtype=torch.float64)
        self._snapshot: list[torch.Tensor] | None = None
        self._had_snapshot = False
        self.track_updates = track_updates

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    # -- device side ---------------------------------------------------------------------------
    def _owner_index(self, device: torch.device, positions: list[int]) -> torch.Tensor:
        key = (device, tuple(positions) if len(positions) != len(self.params) else None)
        idx = self._index_cache.get(key)
        if idx is None:
            idx = torch.tensor([self._owner[i] for i in positions], dtype=torch.long, device=device)
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            self._index_cache[key] = idx
        return idx

    def _device_rows(
        self,
        device: torch.device,
        positions: list[int],
        grads: list[torch.Tensor],
        slow: bool,
        snapshot: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """(_N_ROWS, n_layers) float32 statistics for the gradients living on one device."""
        n = self.n_layers
        idx = self._owner_index(device, positions)
        # float32 accumulation whatever the parameter dtype (fp16/bf16 too); float64 gradients
        # keep float64 (a narrowing dtype is refused by the norm kernels).
        f32 = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        sq = torch.stack(torch._foreach_norm(grads, 2, dtype=f32)).square_()
        l1 = torch.stack(torch._foreach_norm(grads, 1, dtype=f32))
        mx = torch.stack(torch._foreach_norm(grads, math.inf, dtype=f32))
        numel = torch.tensor([float(self._numel[i]) for i in positions], dtype=f32, device=device)
        out = torch.zeros(_N_ROWS, n, dtype=f32, device=device)
        out[_SUMSQ].index_add_(0, idx, sq)
        out[_L1].index_add_(0, idx, l1)
        out[_MAX].scatter_reduce_(0, idx, mx, reduce="amax", include_self=True)
        out[_NUMEL].index_add_(0, idx, numel)
        if slow:
            zeros = torch.stack([(g == 0).sum() for g in grads]).to(f32)
            out[_ZEROS].index_add_(0, idx, zeros)
            params = [_as_real_dense(self.params[i].detach()) for i in positions]
            wsq = torch.stack(torch._foreach_norm(params, 2, dtype=f32)).square_()
            out[_WSUMSQ].index_add_(0, idx, wsq)
        if snapshot is not None:
            current = [_local(self.params[i].detach()) for i in positions]
            before = [snapshot[i] for i in positions]
            diff = torch._foreach_sub(current, before)
            out[_DSQ].index_add_(0, idx, torch.stack(torch._foreach_norm(diff, 2, dtype=f32)).square_())
            out[_SNAPSQ].index_add_(0, idx, torch.stack(torch._foreach_norm(before, 2, dtype=f32)).square_())
        return out

    def compute_on_device(self, slow: bool) -> list[tuple[torch.device, torch.Tensor, list[int]]]:
        """Launch the statistics; returns per device the (rows, layers) tensor, not yet copied.

        On a slow-stat step the weights are also snapshotted, so the next call measures the size
        of the optimizer update that happened in between (the update-to-weight ratio).
        """
        snapshot = self._usable_snapshot()
        self._snapshot = None
        by_device: dict[torch.device, tuple[list[int], list[torch.Tensor]]] = {}
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided or g.is_complex() or type(g) is not torch.Tensor:
                g = _as_real_dense(g)
            entry = by_device.get(g.device)
            if entry is None:
                entry = by_device[g.device] = ([], [])
            entry[0].append(i)
            entry[1].append(g)
        partials = [
            (device, self._device_rows(device, positions, grads, slow, snapshot), positions)
            for device, (positions, grads) in by_device.items()
        ]
        self._had_snapshot = snapshot is not None
        if slow and self.track_updates:
            with torch.no_grad():
                self._snapshot = [_local(p.detach()).clone() for p in self.params]
        return partials

    def _usable_snapshot(self) -> list[torch.Tensor] | None:
        snap = self._snapshot
        if snap is None or len(snap) != len(self.params):
            return None
        for s, p in zip(snap, self.params, strict=True):
            p = _local(p)
            if s.shape != p.shape or s.device != p.device or s.dtype != p.dtype:
                return None
        return snap

    # -- host side -----------------------------------------------------------------------------
    def finish(
        self, partials: list[tuple[torch.device, torch.Tensor, list[int]]], host: list[torch.Tensor], slow: bool
    ) -> StepStats:
        """Combine per-device host copies into per-layer metrics (float64)."""
        n = self.n_layers
        rows = torch.zeros(_N_ROWS, n, dtype=torch.float64)
        for t in host:
            t = t.to(torch.float64)
            rows[_SUMSQ] += t[_SUMSQ]
            rows[_L1] += t[_L1]
            rows[_MAX] = torch.maximum(rows[_MAX], t[_MAX])
            rows[_NUMEL] += t[_NUMEL]
            rows[_ZEROS] += t[_ZEROS]
            rows[_WSUMSQ] += t[_WSUMSQ]
            rows[_DSQ] += t[_DSQ]
            rows[_SNAPSQ] += t[_SNAPSQ]
        nonfinite = torch.zeros(n, dtype=torch.float64)
        bad = [
            i for i in range(n)
            if not (math.isfinite(rows[_SUMSQ, i]) and math.isfinite(rows[_L1, i]) and math.isfinite(rows[_MAX, i]))
        ]
        if bad:
            self._repair(rows, nonfinite, bad, slow)
        values = torch.full((n, len(GRAD_METRICS)), math.nan, dtype=torch.float64)
        present = rows[_NUMEL] > 0
        norm = rows[_SUMSQ].sqrt()
        values[:, G["grad_norm"]] = torch.where(present, norm, math.nan)
        values[:, G["grad_mean_abs"]] = torch.where(present, rows[_L1] / rows[_NUMEL].clamp_min(1), math.nan)
        values[:, G["grad_max_abs"]] = torch.where(present, rows[_MAX], math.nan)
        values[:, G["nonfinite"]] = torch.where(present, nonfinite, math.nan)
        if slow:
            values[:, G["grad_zero_frac"]] = torch.where(present, rows[_ZEROS] / rows[_NUMEL].clamp_min(1), math.nan)
            wnorm = rows[_WSUMSQ].sqrt()
            self._last_weight_norm = torch.where(present, wnorm, self._last_weight_norm)
            values[:, G["weight_norm"]] = torch.where(present, wnorm, math.nan)
        if self._had_snapshot:
            snap = rows[_SNAPSQ]
            values[:, G["update_ratio"]] = torch.where(snap > 0, (rows[_DSQ] / snap).sqrt(), math.nan)
        w = self._last_weight_norm
        ratio = torch.where(w > 0, norm / w, math.nan)
        values[:, G["grad_to_weight"]] = torch.where(present, ratio, math.nan)
        total = float(rows[_SUMSQ][present].sum().sqrt()) if bool(present.any()) else math.nan
        return StepStats(values=values, total_norm=total, nonfinite_layers=bad if nonfinite.any() else [])

    def _repair(self, rows: torch.Tensor, nonfinite: torch.Tensor, bad: list[int], slow: bool) -> None:
        """Slow path for layers whose reductions are non-finite: count, then recompute over finite values."""
        for li in bad:
            sumsq = l1 = mx = zeros = 0.0
            count = 0
            for p in self.layers[li].params:
                if p.grad is None:
                    continue
                g = _as_real_dense(p.grad).detach().to(torch.float64)
                finite = torch.isfinite(g)
                count += int((~finite).sum())
                gf = g[finite]
                if gf.numel():
                    sumsq += float(gf.square().sum())
                    l1 += float(gf.abs().sum())
                    mx = max(mx, float(gf.abs().max()))
                if slow:
                    zeros += float((g == 0).sum())
            nonfinite[li] = count
            rows[_SUMSQ, li] = sumsq
            rows[_L1, li] = l1
            rows[_MAX, li] = mx
            if slow:
                rows[_ZEROS, li] = zeros


_SUM_ROWS = [_SUMSQ, _L1, _NUMEL, _ZEROS, _WSUMSQ, _DSQ, _SNAPSQ]


def reduce_sharded_rows(rows: torch.Tensor, group: object = None, replicas: torch.Tensor | None = None) -> torch.Tensor:
    """All-reduce statistic rows of sharded parameters: sums add up (sum of squares, L1, counts),
    maxima take the max. Every rank must call it at the same step (it is a collective).

    Args:
        rows: the ``(rows, layers)`` statistics of this rank's shards.
        group: the process group to reduce over (default: the whole world).
        replicas: optional per-layer count of ranks in ``group`` holding a copy of the same elements
            (1 for a layer sharded across all of them, the group size for a replicated one); the
            summed rows are divided by it so replicated layers are not counted several times.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return rows
    sums = rows[_SUM_ROWS].contiguous()
    mx = rows[_MAX].contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    if replicas is not None:
        sums = sums / replicas.to(device=sums.device, dtype=sums.dtype)
    out = rows.clone()
    out[_SUM_ROWS] = sums
    out[_MAX] = mx
    return out


def scale_rows(rows: torch.Tensor, factor: float) -> torch.Tensor:
    """Statistic rows of gradients multiplied by ``factor`` (e.g. ``1 / loss_scale`` for gradients that
    are still scaled by an AMP ``GradScaler``): norms and |g| scale linearly, sums of squares
    quadratically; counts and weight rows are unchanged."""
    out = rows.clone()
    out[_SUMSQ] *= factor * factor
    out[[_L1, _MAX]] *= factor
    return out
