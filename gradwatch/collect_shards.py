"""Sharded parameters: combine per-rank statistic rows, and rescale rows of still-scaled gradients.

Rows follow :data:`gradwatch.metrics.PARTIALS`; each partial's ``reduce`` says how its shards combine.
"""

from __future__ import annotations

import torch

from gradwatch.metrics import MAX_ROWS, PARTIALS, ROW, SUM_ROWS


def zero_rows(n_layers: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Statistic rows of ``n_layers`` layers, all zero: what a failed watcher contributes to a reduction."""
    return torch.zeros(len(PARTIALS), n_layers, dtype=dtype, device=device)


class PeerWatcherFailed(RuntimeError):
    """Raised by :func:`reduce_sharded_rows` on the ranks whose watcher is healthy when the watcher of
    another rank failed: every rank then stops collecting at the same step (none is left waiting in a
    collective that a detached watcher no longer joins)."""


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

    Raises:
        PeerWatcherFailed: on a rank called with ``failed=False`` when some rank passed ``failed=True``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return rows
    sums = rows[SUM_ROWS].contiguous()
    # one extra element carries "some rank's watcher failed" through the max reduction (no extra collective)
    mx = torch.cat([rows[MAX_ROWS].reshape(-1), rows.new_full((1,), float(failed))])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    if not failed and bool(mx[-1] > 0):
        raise PeerWatcherFailed("the watcher on another rank failed; every rank stops collecting at this step")
    mx = mx[:-1].view(len(MAX_ROWS), -1)
    if replicas is not None:
        sums = sums / replicas.to(device=sums.device, dtype=sums.dtype)
    out = rows.clone()
    out[SUM_ROWS] = sums
    out[MAX_ROWS] = mx
    return out


def scale_rows(rows: torch.Tensor, factor: float) -> torch.Tensor:
    """Statistic rows of gradients multiplied by ``factor`` (e.g. ``1 / loss_scale`` for gradients that
    are still scaled by an AMP ``GradScaler``): norms and |g| scale linearly, sums of squares
    quadratically; counts and weight rows are unchanged."""
    out = rows.clone()
    out[ROW["sumsq"]] *= factor * factor
    out[[ROW["l1"], ROW["max_abs"]]] *= factor
    return out
