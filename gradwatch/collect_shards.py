"""Sharded parameters: combine per-rank statistic rows, and rescale rows of still-scaled gradients.

Rows follow :data:`gradwatch.metrics.PARTIALS`; each partial's ``reduce`` says how its shards combine.
"""

from __future__ import annotations

import numpy as np
import torch

from gradwatch.metrics import MAX_ROWS, PARTIALS, ROW, SUM_ROWS

#: the element count a reduced row carries for every layer when some rank's watcher failed (a count is
#: never negative): the news travels with the statistics, read on the host when they are
PEER_FAILED = -1.0


def zero_rows(n_layers: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Statistic rows of ``n_layers`` layers, all zero: what a failed watcher contributes to a reduction."""
    return torch.zeros(len(PARTIALS), n_layers, dtype=dtype, device=device)


class PeerWatcherFailed(RuntimeError):
    """Raised when the reduced rows of a step are read on the host (:func:`raise_if_peer_failed`) on the
    ranks whose watcher is healthy, when the watcher of another rank failed. A watcher that stopped takes
    part in every later reduction with zero rows (see :mod:`gradwatch.row_reduction`), so no rank is left
    waiting in a collective, however late the others read the news."""


def raise_if_peer_failed(numel_row: np.ndarray) -> None:
    """Raise :class:`PeerWatcherFailed` if a host copy's element-count row carries the failure marker."""
    if len(numel_row) and float(numel_row.min()) < 0:
        raise PeerWatcherFailed("the watcher on another rank failed; this rank stops collecting at this step")


def reduce_sharded_rows(rows: torch.Tensor, group: object = None, replicas: torch.Tensor | None = None,
                        failed: bool = False) -> torch.Tensor:
    """All-reduce statistic rows of sharded parameters: sums add up (sum of squares, L1, counts),
    maxima take the max (each partial's ``reduce`` in the schema). Every rank must call it at the same step (it is a collective).

    Args:
        rows: the ``(rows, layers)`` statistics of this rank's shards.
        group: the process group to reduce over (default: the whole world).
        replicas: optional per-layer count of ranks in ``group`` holding a copy of the same elements
            (1 for a layer sharded across all of them, the group size for a replicated one); the
            summed rows are divided by it so replicated layers are not counted several times.
        failed: this rank's watcher failed: it takes part (``rows`` of the usual shape, zeros) only
            to tell the others, and the result is meaningless.

    Returns:
        The reduced rows; when some rank passed ``failed=True`` their element counts are
        :data:`PEER_FAILED` (decided on the device: reading a flag here would make the host wait for
        the device at every reduction; :func:`raise_if_peer_failed` reads it with the statistics).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return rows
    sums = rows[SUM_ROWS].contiguous()
    # one extra element carries "some rank's watcher failed" through the max reduction (no extra collective)
    mx = torch.cat([rows[MAX_ROWS].reshape(-1), rows.new_full((1,), float(failed))])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    peer_failed = mx[-1] > 0  # stays on the device
    mx = mx[:-1].view(len(MAX_ROWS), -1)
    if replicas is not None:
        sums = sums / replicas.to(device=sums.device, dtype=sums.dtype)
    out = rows.clone()
    out[SUM_ROWS] = sums
    out[MAX_ROWS] = mx
    numel = out[ROW["numel"]]
    out[ROW["numel"]] = torch.where(peer_failed, numel.new_full((), PEER_FAILED), numel)
    return out


def scale_rows(rows: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Statistic rows of gradients multiplied by ``factor`` (e.g. ``1 / loss_scale`` for gradients that
    are still scaled by an AMP ``GradScaler``; a 0-d tensor stays on its device): norms and |g| scale
    linearly, sums of squares quadratically; counts and weight rows are unchanged. (Row by row: a
    list index would be a host-to-device copy.)"""
    out = rows.clone()
    out[ROW["sumsq"]] *= factor * factor
    out[ROW["l1"]] *= factor
    out[ROW["max_abs"]] *= factor
    return out
