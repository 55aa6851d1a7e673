"""Batched per-layer gradient statistics: a few fused passes over the gradients, one host copy per step.

Every collected step computes, for every layer, the sum of squares of its gradients (the L2 norm,
and finiteness for free) -- one read of the gradient memory, the floor for any per-layer statistic;
every ``slow`` step (the watcher's ``slow_stats_every_n`` cadence) adds the largest magnitude, the
L1 norm (mean |g|), the count of exact zeros, the weight norm and, on the collected step after it,
the size of the optimizer update. (On CPU each of those is another read of the gradients or the
weights: ``benchmarks/overhead.py`` measures a max |g| every step at +2 % of a deep MLP's step.) Per-parameter results are scattered into per-layer
rows on the gradients' device (``index_add_``/``scatter_reduce_``) and the watcher copies that one
small tensor to the host. Nothing syncs with the device before that copy.

How the reductions are batched depends on the device, because the costs differ (see
``benchmarks/overhead.py --ops``):

- on accelerators, ``torch._foreach_norm`` (orders 2 and inf; 1 and 0 on slow steps) runs as a few
  multi-tensor kernels whatever the number of parameters;
- on CPU, ``_foreach_*`` is a C++ loop of one full reduction per tensor, and any large temporary
  (``abs()``, an infinity norm) costs more than the reduction itself. So large float32 tensors
  (>= 4K elements, or alone with their shape) are reduced with a BLAS dot product (and, on slow
  steps, ``aminmax``) per tensor -- each reads the tensor once, no temporary -- and small tensors
  sharing a shape are stacked (one copy of a few KiB) and reduced along one dimension, so a model
  with thousands of small layers pays a handful of ops per shape, not per tensor. The slow step's L1
  norm and zero count come from ``sign(g)`` in a small reusable scratch buffer:
  ``g . sign(g) = sum |g|`` and ``sign(g) . sign(g)`` = number of non-zeros.

Non-finite values do not poison the finite statistics: a NaN or Inf makes its layer's sum of
squares non-finite, which is how it is detected for free (a finite sum of squares proves every
element finite); only then (a rare, already broken step) :meth:`GradientCollector._repair` counts
the non-finite values and recomputes that layer's statistics over its finite values in float64,
at the cost of extra host syncs. Sums of squares that overflow float32 take the same path, and so
do those that underflow it (|g| < ~1e-19): between slow steps, where max |g| is not measured, an
exact 0 counts as a zero gradient when the layer's last measured max |g| was 0 as well.

Memory: nothing parameter-sized is allocated per step. With ``track_updates`` the collector keeps
one persistent copy of the weights (allocated on the first slow step, reused, freed by the watcher's
``close()``); the CPU scratch buffer is at most 4 MiB per device.

This module runs a step (device launch, then host finish); how tensors are grouped lives in
:mod:`gradwatch.collect_plan`, the reductions in :mod:`gradwatch.collect_reduce`, the all-reduce of
sharded rows in :mod:`gradwatch.collect_shards`, and the rows and metric columns in :mod:`gradwatch.metrics`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gradwatch.collect_plan import ReductionPlan, WeightSnapshot, as_real_dense, local_shard
from gradwatch.collect_reduce import CHUNK, slot_statistics, weight_statistics
from gradwatch.collect_shards import (
    PEER_FAILED,
    PeerWatcherFailed,
    raise_if_peer_failed,
    reduce_sharded_rows,
    scale_rows,
    zero_rows,
)
from gradwatch.layers import LayerInfo
from gradwatch.metrics import GRAD, GRAD_METRICS, MAX_ROWS, PARTIALS, ROW, SUM_ROWS
from gradwatch.transfer import resolve_hot_path

#: column index of each gradient metric (``G["grad_norm"]``), from the schema in :mod:`gradwatch.metrics`
G = GRAD
# rows of the on-device statistics (:data:`gradwatch.metrics.PARTIALS`)
_SUMSQ, _L1, _MAX, _NUMEL, _ZEROS, _WSUMSQ, _DSQ, _SNAPSQ = (ROW[name] for name in (
    "sumsq", "l1", "max_abs", "numel", "zeros", "weight_sumsq", "update_sumsq", "snapshot_sumsq"))
_N_ROWS = len(PARTIALS)
#: float32 sums of squares below this are recomputed in float64 (``finish``); above it the squares
#: lost to underflow (< 2**-149 each) change the sum by less than n * 2**-49 relative.
_TINY_SUMSQ = 2.0**-100


@dataclass
class StepStats:
    """Host-side statistics of one collected step: ``values[layer, metric]`` in GRAD_METRICS order."""

    values: torch.Tensor  # float64, (n_layers, len(GRAD_METRICS)); NaN = not measured / no gradient
    total_norm: float
    nonfinite_layers: list[int]
    #: a common step (every layer measured, all finite, no slow statistics): its recording may be batched
    fast: bool = False


@dataclass(frozen=True)
class Launched:
    """A computed step, as :meth:`GradientCollector.finish` needs to know it when it runs later."""

    had_snapshot: bool   # the update ratio was measured (a snapshot from the previous collected step)
    all_present: bool    # every layer had a gradient, on one device
    repairable: bool     # the step's gradients are still there (non-finite layers can be recounted)


_PLAIN = {torch.Tensor}
_GRAD = operator.attrgetter("grad")
#: torch's C++ grouping of tensor lists by (device, dtype), as its foreach optimizers use it
_GROUP = getattr(torch._C, "_group_tensors_by_device_and_dtype", None)

#: gradient dtypes reduced as they are (anything else -- complex, integer -- goes through ``as_real_dense``)
_REAL_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})

class GradientCollector:
    """Computes per-layer gradient statistics for a fixed list of layers.

    Args:
        layers: the layers, in the order their rows should appear (depth order).
        track_updates: on slow-stat steps copy the weights into a persistent buffer (one extra
            parameter-sized buffer, allocated once) to measure the update-to-weight ratio on the
            next collected step.
    """

    def __init__(self, layers: Sequence[LayerInfo], track_updates: bool = True, hot_path: str = "auto"):
        resolve_hot_path(hot_path, torch.device("cpu"))  # validates the name
        #: "auto" (by device), "host" or "accelerator" (``_foreach_*`` plans, float64 sums: nothing
        #: on the host needs the gradients once the step is launched, see ``gradwatch.transfer``)
        self.hot_path = hot_path
        self.layers = list(layers)
        self.params: list[torch.nn.Parameter] = [p for layer in self.layers for p in layer.params]
        owner = [i for i, layer in enumerate(self.layers) for _ in layer.params]
        self._owner = owner
        self._numel = [local_shard(p).numel() for p in self.params]  # local shard (reduced across ranks)
        self._all_positions = list(range(len(self.params)))
        #: the weights are read as they are (dense, real, not sharded): no per-parameter conversion
        self._plain_weights = all(type(p) in (torch.nn.Parameter, torch.Tensor) and p.layout == torch.strided
                                  and not p.is_complex() for p in self.params)
        #: a module that can produce sparse gradients (``sparse=True`` embeddings): always the full check
        self._maybe_sparse = _GROUP is None or any(getattr(layer.module, "sparse", False) is True for layer in self.layers) \
            or any(p.layout != torch.strided for p in self.params)
        self._plans: dict[tuple, ReductionPlan] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}
        self._last_weight_norm = np.full(len(self.layers), math.nan)
        #: fast host path: (weight norms, 1 / them, row template), rebuilt when the weight norms change
        self._fast_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._all_present = False  # every layer had a gradient on the last computed step (one device)
        self._plan_all_present = False
        self._last_max = np.full(len(self.layers), math.inf)  # max |g| of the last slow step (unknown: inf)
        #: per device, the weight copy for the update ratio; ``None`` frees them (the watcher's close)
        self._snapshot: dict[torch.device, WeightSnapshot] | None = None
        self._had_snapshot = False
        self.track_updates = track_updates

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    # -- device side ---------------------------------------------------------------------------
    def _plan(self, kind: str, device: torch.device, positions: list[int], tensors: list[torch.Tensor],
              acc: torch.dtype, odd: bool) -> tuple[tuple, ReductionPlan]:
        key = (kind, device, acc, odd, tuple(positions) if len(positions) != len(self.params) else None)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 64:
                self._plans.clear()
            batched = device.type == "cpu" and not odd and not self.accelerator_path(device)
            plan = self._plans[key] = ReductionPlan(tensors, positions, self._owner, self._numel, self.n_layers, device, acc,
                                            batched)
        return key, plan

    def accelerator_path(self, device: torch.device) -> bool:
        """Whether gradients on ``device`` take the accelerator path (delayed host copy)."""
        return resolve_hot_path(self.hot_path, device) == "accelerator"

    def _scratch_for(self, device: torch.device) -> torch.Tensor:
        s = self._scratch.get(device)
        if s is None:
            s = self._scratch[device] = torch.empty(CHUNK, dtype=torch.float32, device=device)
        return s


    def _device_rows(
        self,
        device: torch.device,
        positions: list[int],
        grads: list[torch.Tensor],
        slow: bool,
        odd: bool,
        wide: bool,
    ) -> torch.Tensor:
        """(_N_ROWS, n_layers) statistics for the gradients living on one device (float32; float64
        when a gradient is float64: ``wide``)."""
        acc = torch.float64 if wide else torch.float32
        key, plan = self._plan("grad", device, positions, grads, acc, odd)
        self._plan_all_present = plan.all_present
        idx = plan.idx
        out = torch.zeros(_N_ROWS, self.n_layers, dtype=acc, device=device)
        scratch = self._scratch_for(device) if slow and plan.big else None
        stats = slot_statistics(plan, grads, full=slow, extra=slow, scratch=scratch)
        out[_SUMSQ].index_add_(0, idx, stats[0])
        out[_NUMEL] = plan.numel_row
        if slow:
            out[_MAX].scatter_reduce_(0, idx, stats[1], reduce="amax", include_self=True)
            out[_L1].index_add_(0, idx, stats[2])
            out[_ZEROS] = plan.numel_row
            out[_ZEROS].index_add_(0, idx, stats[3], alpha=-1)
        snaps = self._snapshot if self.track_updates else None
        snap = snaps.get(device) if snaps is not None else None
        pending = snap is not None and snap.wsq is not None  # a snapshot taken on the previous collected step
        if slow or pending:
            # weights, in the slot order of the parameters' own plan (same positions as the gradients)
            if positions is self._all_positions and self._plain_weights:
                params = self.params  # under no_grad: no detach op per parameter
            else:
                params = [local_shard(self.params[i]) for i in positions]
                params = [w if w.layout == torch.strided and not w.is_complex() else as_real_dense(w) for w in params]
            wkey, wplan = self._plan("weight", device, positions, params, acc, False)
            diff = pending and snap.key == wkey
            keep = slow and self.track_updates
            if keep and (snap is None or snap.key != wkey):
                snap = WeightSnapshot(wkey)
                if snaps is None:
                    snaps = self._snapshot = {}
                snaps[device] = snap
            dsq, wsq = weight_statistics(wplan, params, snap, diff=diff, norm=slow, keep=keep)
            if diff:
                # one optimizer step since the snapshot: ||w_t - w_{t+1}|| and ||w_t||
                out[_DSQ].index_add_(0, wplan.idx, dsq)
                out[_SNAPSQ].index_add_(0, wplan.idx, snap.wsq)
                self._had_snapshot = True
            if snap is not None:
                snap.wsq = wsq if keep else None
            if slow:
                out[_WSUMSQ].index_add_(0, wplan.idx, wsq)
        return out


    def _uniform(self, grads: list[torch.Tensor | None]) -> tuple[torch.device, torch.dtype] | None:
        """``(device, dtype)`` when every parameter has a plain dense gradient of one real dtype on
        one device (checked by C loops: types, then torch's own grouping); else ``None``."""
        if not grads or self._maybe_sparse or set(map(type, grads)) != _PLAIN:
            return None
        groups = _GROUP([grads], False)
        if len(groups) != 1:
            return None
        ((device, dtype),) = groups
        return (device, dtype) if dtype in _REAL_DTYPES else None

    def compute_on_device(self, slow: bool) -> list[tuple[torch.device, torch.Tensor, list[int]]]:
        """Launch the statistics; returns per device the (rows, layers) tensor, not yet copied.

        On a slow-stat step the weights are also copied into a persistent buffer, so the next call
        measures the size of the optimizer update that happened in between (the update-to-weight
        ratio).
        """
        self._had_snapshot = False
        by_device: dict[torch.device, tuple[list[int], list[torch.Tensor], list[bool]]] = {}
        with torch.no_grad():
            grads = list(map(_GRAD, self.params))
            uniform = self._uniform(grads)
            if uniform is not None:  # the common case, without a Python loop over the parameters
                by_device[uniform[0]] = (self._all_positions, grads, [False, uniform[1] == torch.float64])
            for i, p in enumerate(self.params if uniform is None else ()):
                g = p.grad
                if g is None:
                    continue
                odd = type(g) is not torch.Tensor or g.layout != torch.strided or g.dtype not in _REAL_DTYPES
                if odd:
                    g = as_real_dense(g)
                entry = by_device.get(g.device)
                if entry is None:
                    entry = by_device[g.device] = ([], [], [False, False])
                entry[0].append(i)
                entry[1].append(g)
                if odd:
                    entry[2][0] = True
                if g.dtype == torch.float64:
                    entry[2][1] = True
            if self._snapshot is not None and not self.track_updates:
                self._snapshot = None
            # the accelerator path sums in float64: a float32 sum of squares can underflow, and its
            # repair needs the gradients, gone by the time a delayed copy is read
            partials = [
                (device, self._device_rows(device, positions, grads, slow, flag[0],
                                           flag[1] or self.accelerator_path(device)), positions)
                for device, (positions, grads, flag) in by_device.items()
            ]
            self._all_present = len(by_device) == 1 and self._plan_all_present
            for device, snap in (self._snapshot or {}).items():
                if device not in by_device:
                    snap.wsq = None  # no gradients there this step: the snapshot is stale
        return partials

    def release_snapshot(self) -> None:
        """Free the weight copy kept for the update ratio (the watcher detached: no next step)."""
        self._snapshot = None

    def launched(self) -> Launched:
        """What :meth:`finish` needs to know about the step just computed, if it runs later."""
        return Launched(self._had_snapshot, self._all_present, repairable=False)

    # -- host side -----------------------------------------------------------------------------
    def finish(
        self, partials: object, host: list[torch.Tensor], slow: bool, launched: Launched | None = None
    ) -> StepStats:
        """Combine per-device host copies into per-layer metrics (float64).

        ``launched`` (from :meth:`launched`) describes a step computed earlier whose gradients may
        be gone (a delayed copy): a layer whose sums are non-finite is then recorded with a
        ``nonfinite`` count of 1 (at least one non-finite element; counting needs the gradients)
        and its finite statistics as not measured. Without it, the step just computed.
        ``partials`` is unused (kept for callers of the former signature).
        """
        n = self.n_layers
        for t in host:  # rows reduced across ranks (sharded parameters) say so if another rank's watcher failed
            raise_if_peer_failed(t.numpy()[_NUMEL])
        state = launched or Launched(self._had_snapshot, self._all_present, repairable=True)
        if len(host) == 1 and not slow and not state.had_snapshot:
            fast = self._finish_fast(host[0], state.all_present)
            if fast is not None:
                return fast
        if len(host) == 1:
            rows = host[0].numpy().astype(np.float64)  # a copy: _repair may write into it
        else:
            rows = np.zeros((_N_ROWS, n))
            rows[MAX_ROWS] = -np.inf
            for t in host:
                a = t.numpy().astype(np.float64)
                rows[SUM_ROWS] += a[SUM_ROWS]
                rows[MAX_ROWS] = np.maximum(rows[MAX_ROWS], a[MAX_ROWS])
        nonfinite = np.zeros(n)
        present = rows[_NUMEL] > 0
        everywhere = bool(present.all())
        sumsq, mx = rows[_SUMSQ], rows[_MAX]
        # the common case costs a few whole-array reductions; per-layer masks only when something is off
        bad: list[int] = []
        if not math.isfinite(float(sumsq.sum() + mx.sum() + (rows[_L1].sum() if slow else 0.0))):
            check = sumsq + mx + (rows[_L1] if slow else 0.0)
            bad = np.flatnonzero(present & ~np.isfinite(check)).tolist()
        if any(t.dtype != torch.float64 for t in host) and float(np.min(sumsq, initial=np.inf)) < _TINY_SUMSQ:
            # a float32 sum of squares below 2**-100 has lost precision (the squares of |g| < 1e-19 are
            # subnormal, of |g| < 1e-23 zero): a layer of tiny non-zero gradients would read as "no
            # gradient" (grad_norm 0) exactly when gradients vanish; recompute those layers in float64
            # (an exact 0 is a zero gradient when the layer's last measured max |g| was 0 too)
            nonzero = (mx > 0) if slow else ((sumsq > 0) | (self._last_max > 0))
            tiny = np.flatnonzero(present & nonzero & (sumsq < _TINY_SUMSQ)).tolist()
            bad = sorted(set(bad).union(tiny)) if tiny else bad
        unmeasured: list[int] = []
        if bad and state.repairable:
            self._repair(rows, nonfinite, bad, slow)
        elif bad:  # a delayed step: its gradients are gone (a float32 tiny sum stays as it is)
            unmeasured = np.flatnonzero(present & ~np.isfinite(sumsq + mx + (rows[_L1] if slow else 0.0))).tolist()
            nonfinite[unmeasured] = 1.0
            rows[_SUMSQ, unmeasured] = 0.0  # kept out of the total norm; recorded as NaN below
            mx[unmeasured] = math.inf  # unknown (not "no gradient") for the next steps' zero test
        if slow:
            self._last_max = mx if everywhere else np.where(present, mx, self._last_max)
        values = np.full((n, len(GRAD_METRICS)), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = np.sqrt(sumsq)
            values[:, G["grad_norm"]] = norm
            values[:, G["nonfinite"]] = nonfinite
            if slow:
                values[:, G["grad_max_abs"]] = mx
                numel = np.maximum(rows[_NUMEL], 1)
                values[:, G["grad_mean_abs"]] = rows[_L1] / numel
                values[:, G["grad_zero_frac"]] = rows[_ZEROS] / numel
                wnorm = np.sqrt(rows[_WSUMSQ])
                self._last_weight_norm = wnorm if everywhere else np.where(present, wnorm, self._last_weight_norm)
                values[:, G["weight_norm"]] = wnorm
            if state.had_snapshot:
                snap = rows[_SNAPSQ]
                values[:, G["update_ratio"]] = np.sqrt(rows[_DSQ] / snap)  # 0/0 -> NaN
                values[snap <= 0, G["update_ratio"]] = np.nan
            w = self._last_weight_norm
            values[:, G["grad_to_weight"]] = norm / w
            values[~(w > 0), G["grad_to_weight"]] = np.nan
        if not everywhere:
            values[~present] = np.nan  # no gradient: not measured (update_ratio is NaN there anyway)
        if unmeasured:
            keep = values[unmeasured, G["nonfinite"]]
            values[unmeasured] = np.nan
            values[unmeasured, G["nonfinite"]] = keep
        total = float(np.sqrt(sumsq[present].sum() if not everywhere else sumsq.sum())) if present.any() else math.nan
        return StepStats(values=torch.from_numpy(values), total_norm=total,
                         nonfinite_layers=np.flatnonzero(nonfinite).tolist() if bad else [])

    def _finish_fast(self, host: torch.Tensor, all_present: bool) -> StepStats | None:
        """:meth:`finish` for the common step: one device, not a slow step, every layer with a
        gradient, every sum of squares finite and large enough to be exact. ``None`` otherwise."""
        if host.dtype not in (torch.float32, torch.float64) or not all_present:
            return None
        sumsq32 = host.numpy()[_SUMSQ]
        total_sq = float(sumsq32.sum(dtype=np.float64))
        if not math.isfinite(total_sq) or (host.dtype == torch.float32 and float(sumsq32.min()) < _TINY_SUMSQ):
            return None
        w = self._last_weight_norm
        cache = self._fast_cache
        if cache is None or cache[0] is not w:
            # per weight-norm update (slow steps), not per step: 1 / ||w|| and a row template
            template = np.full((self.n_layers, len(GRAD_METRICS)), np.nan)
            template[:, G["nonfinite"]] = 0.0
            with np.errstate(divide="ignore", invalid="ignore"):
                cache = self._fast_cache = (w, np.where(w > 0, 1.0 / w, np.nan), template)
        values = cache[2].copy()
        norm = np.sqrt(sumsq32, dtype=np.float64)
        values[:, G["grad_norm"]] = norm
        np.multiply(norm, cache[1], out=values[:, G["grad_to_weight"]])
        return StepStats(values=torch.from_numpy(values), total_norm=math.sqrt(total_sq), nonfinite_layers=[], fast=True)

    def _repair(self, rows: np.ndarray, nonfinite: np.ndarray, bad: list[int], slow: bool) -> None:
        """Slow path for layers whose reductions are non-finite: count, then recompute over finite values."""
        for li in bad:
            sumsq = l1 = mx = zeros = 0.0
            count = 0
            for p in self.layers[li].params:
                if p.grad is None:
                    continue
                g = as_real_dense(p.grad).detach().to(torch.float64)
                finite = torch.isfinite(g)
                count += int((~finite).sum())
                gf = g[finite]
                if gf.numel():
                    sumsq += float(gf.square().sum())
                    l1 += float(gf.abs().sum())
                    mx = max(mx, float(gf.abs().max()))
                if slow:  # a sparse gradient's implicit elements are zeros too
                    zeros += float((g == 0).sum()) + (local_shard(p).numel() - g.numel())
            nonfinite[li] = count
            rows[_SUMSQ, li] = sumsq
            rows[_L1, li] = l1
            rows[_MAX, li] = mx
            if slow:
                rows[_ZEROS, li] = zeros



__all__ = ["G", "GRAD_METRICS", "PEER_FAILED", "GradientCollector", "Launched", "PeerWatcherFailed", "StepStats",
           "reduce_sharded_rows", "scale_rows", "zero_rows"]
