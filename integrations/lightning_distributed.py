"""What ``GradWatchCallback`` needs when a Trainer runs several processes.

- :func:`from_rank_zero` / :func:`agree`: one decision, rank zero's, on every rank at the same step;
- :func:`broadcast_modules`: rank zero's re-initialised or new weights copied to every rank;
- :class:`ShardReducer`: per-layer statistic rows all-reduced across ranks for sharded parameters
  (FSDP2/DTensor, FSDP), so every rank records the statistics of whole layers;
- :func:`destroy_gloo_group_at_exit` (from :mod:`gradwatch.integrations.gloo_exit`): a clean exit for gloo
  process groups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from gradwatch.collect import reduce_sharded_rows, zero_rows
from gradwatch.integrations.gloo_exit import destroy_gloo_group_at_exit
from gradwatch.layers import ROOT_NAME, clean_name

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from gradwatch.watcher import GradWatcher

log = logging.getLogger(__name__)


def strategy_kind(trainer: Trainer) -> str:
    """``"single"`` (one process, no wrapper), ``"ddp"`` (replicated parameters behind a DDP wrapper) or
    ``"sharded"`` (FSDP, ModelParallel/DTensor, DeepSpeed, or any other multi-process strategy)."""
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy | FSDPStrategy | ModelParallelStrategy):
        return "sharded"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    return "sharded" if trainer.world_size > 1 else "single"


# -- agreeing across processes -------------------------------------------------------------------------
def from_rank_zero(trainer: Trainer, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on global rank zero only and give its result to every rank; an exception on rank zero
    is raised on every rank (no rank is left waiting in a collective)."""
    if trainer.world_size <= 1:
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if trainer.is_global_zero:
        try:
            outcome = (True, fn())
        except Exception as exc:  # re-raised below, on every rank
            outcome = (False, f"{type(exc).__name__}: {exc}")
    ok, value = trainer.strategy.broadcast(outcome, src=0)
    if not ok:
        raise RuntimeError(f"gradwatch: failed on rank zero: {value}")
    return value


def agree(trainer: Trainer, value: Any) -> Any:
    """Rank zero's ``value`` on every rank (a broadcast); ``value`` itself in one process."""
    return trainer.strategy.broadcast(value, src=0) if trainer.world_size > 1 else value


@torch.no_grad()
def broadcast_modules(trainer: Trainer, module: nn.Module, prefixes: Iterable[str]) -> int:
    """Copy rank zero's parameters and buffers under ``prefixes`` (module paths, clean names) to every rank.

    A collective: every rank must call it. Tensors travel through the host (``strategy.broadcast``
    pickles them), so it works before the model reaches its device and with any backend.

    Returns:
        How many tensors were copied.
    """
    prefixes = set(prefixes)
    every = bool(prefixes & {"", ROOT_NAME})
    local = module.state_dict()
    keys = [k for k in local if every or any(clean_name(k) == p or clean_name(k).startswith(p + ".") for p in prefixes)]
    payload = {k: local[k].detach().cpu() for k in keys} if trainer.is_global_zero else None
    payload = trainer.strategy.broadcast(payload, src=0)
    for key, value in payload.items():
        local[key].copy_(value)
    return len(payload)


def structure_fingerprint(module: nn.Module) -> str:
    """The module tree (names and classes) and parameter shapes, to check that every rank built the same model."""
    parts = [f"{n}:{type(m).__name__}" for n, m in module.named_modules()]
    parts += [f"{n}:{tuple(p.shape)}" for n, p in module.named_parameters()]
    return "|".join(parts)


class ShardReducer:
    """All-reduces per-layer statistic rows across ranks for sharded parameters (FSDP2/DTensor, FSDP).

    Sums are divided by each layer's replica count (how many ranks hold a copy of the same elements)
    so a layer that is replicated rather than sharded is not counted once per rank. ``then`` (e.g. the
    AMP unscaling) is applied to the reduced rows. A collective: once the watcher of this rank stopped,
    it takes part through :meth:`abstain` at every collected step, and the watchers of the other ranks
    stop when they read the reduced rows that carry the news (then abstain as well).
    """

    def __init__(self, watcher: GradWatcher, world_size: int, flat_sharded: bool,
                 then: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.watcher = watcher
        self.world_size = world_size
        self.flat_sharded = flat_sharded  # FSDP1 (use_orig_params): plain tensors that are local shards
        self.then = then
        self._layers: list[Any] | None = None
        self._replicas: torch.Tensor | None = None
        self._last: torch.Tensor | None = None  # the last rows reduced: shape, dtype and device to abstain with

    @classmethod
    def for_trainer(cls, trainer: Trainer, module: torch.nn.Module, watcher: GradWatcher,
                    then: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ShardReducer | None:
        world_size = trainer.world_size
        if world_size <= 1:
            return None
        # FSDP (FSDPStrategy, use_orig_params=True): parameters are plain tensors holding this rank's
        # flat shard. FSDP2 / ModelParallelStrategy / tensor parallelism: DTensor parameters.
        fsdp1 = isinstance(trainer.strategy, FSDPStrategy)
        dtensor = any(is_dtensor(p) for p in module.parameters())
        return cls(watcher, world_size, flat_sharded=fsdp1, then=then) if dtensor or fsdp1 else None

    def replicas(self) -> torch.Tensor:
        layers = self.watcher.layers
        if self._replicas is None or self._layers is not layers:
            counts = []
            for layer in layers:
                per_param = {self._replicas_of(p) for p in layer.params}
                if len(per_param) > 1:
                    log.warning("gradwatch: layer %s mixes sharded and replicated parameters; its reduced "
                                "statistics count the replicated ones more than once", layer.name)
                counts.append(float(min(per_param)) if per_param else 1.0)
            self._layers = layers
            self._replicas = torch.tensor(counts, dtype=torch.float32)
        return self._replicas

    def _replicas_of(self, p: torch.Tensor) -> int:
        if is_dtensor(p):
            mesh = p.device_mesh
            shards = 1
            for dim, placement in enumerate(p.placements):
                if placement.is_shard():
                    shards *= mesh.size(dim)
            return max(1, self.world_size // shards)
        return 1 if self.flat_sharded else self.world_size

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self._last = rows
        rows = reduce_sharded_rows(rows, None, replicas=self.replicas())
        return self.then(rows) if self.then is not None else rows

    def abstain(self) -> None:
        """Take part in this step's reduction with zero rows, telling every rank that this one's watcher stopped."""
        reduce_sharded_rows(self._zero_rows(), None, replicas=self.replicas(), failed=True)

    def join_empty(self) -> None:
        """Take part in this step's reduction with zero rows: this rank has no gradients on this step."""
        reduce_sharded_rows(self._zero_rows(), None, replicas=self.replicas())

    def _zero_rows(self) -> torch.Tensor:
        last = self._last
        if last is not None:
            return torch.zeros_like(last)
        # before its first reduction: the rows the collector would have made
        params = [p for layer in self.watcher.layers for p in layer.params]
        return zero_rows(len(self.watcher.layers), device=params[0].device if params else None)


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


__all__ = ["ShardReducer", "agree", "broadcast_modules", "destroy_gloo_group_at_exit", "from_rank_zero", "is_dtensor",
           "strategy_kind", "structure_fingerprint"]
