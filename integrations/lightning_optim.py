"""An optimizer whose parameter groups a fix changed mid-run, and the LR schedulers that follow it.

``torch.optim.lr_scheduler`` zips its per-group lists (``base_lrs``, ``lr_lambdas``...) with the
optimizer's groups: a group a fix adds (``add_param_group``) must be added to every scheduler of that
optimizer, and a resumed run must rebuild the groups as they were saved before their state loads.
Only public attributes are touched; ``get_last_lr()`` follows at the scheduler's next ``step()``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

log = logging.getLogger(__name__)

#: Public scheduler attributes holding one value per parameter group (torch.optim.lr_scheduler).
PER_GROUP_ATTRS: tuple[str, ...] = ("base_lrs", "lr_lambdas", "max_lrs", "base_momentums", "max_momentums", "min_lrs")
_NOT_HYPER = ("params", "param_names")


def hyper(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's hyperparameters (everything but its parameters)."""
    return {k: v for k, v in group.items() if k not in _NOT_HYPER}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        try:
            return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))
        except (RuntimeError, TypeError):
            return False
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return a is b


def source_groups(optimizer: torch.optim.Optimizer, n_before: int) -> list[int]:
    """For each group added after the first ``n_before``, the index of the older group it copied
    (``add_param_group`` with the hyperparameters of the replaced layer's group): the first with equal
    hyperparameters, else 0."""
    old = [hyper(g) for g in optimizer.param_groups[:n_before]]
    out = []
    for group in optimizer.param_groups[n_before:]:
        new = hyper(group)
        match = next((j for j, h in enumerate(old) if h.keys() == new.keys() and all(_same(h[k], new[k]) for k in h)), 0)
        out.append(match)
    return out


def schedulers_of(trainer: Trainer, optimizer: torch.optim.Optimizer) -> list[Any]:
    return [cfg.scheduler for cfg in trainer.lr_scheduler_configs if getattr(cfg.scheduler, "optimizer", None) is optimizer]


def resize_scheduler(scheduler: Any, n_before: int, n_after: int, sources: Sequence[int]) -> list[str]:
    """Make a scheduler's per-group lists fit ``n_after`` groups: groups added after ``n_before`` take the
    values of their source group (``sources``), removed ones are dropped. Returns the attributes changed."""
    changed: list[str] = []
    # SequentialLR and ChainedScheduler keep their schedulers in `_schedulers` (torch has no public accessor)
    for inner in getattr(scheduler, "_schedulers", None) or ():
        changed += resize_scheduler(inner, n_before, n_after, sources)
    for attr in PER_GROUP_ATTRS:
        values = getattr(scheduler, attr, None)
        if not isinstance(values, list) or len(values) != n_before or n_before == n_after:
            continue
        if n_after > n_before:
            values = values + [values[j] for j in sources]
        else:
            values = values[:n_after]
        setattr(scheduler, attr, values)
        changed.append(f"{type(scheduler).__name__}.{attr}")
    return changed


def fit_schedulers(trainer: Trainer, optimizer: torch.optim.Optimizer, n_before: int,
                   sources: Sequence[int] | None = None) -> list[str]:
    """Resize every scheduler of ``optimizer`` from ``n_before`` groups to its current number of groups."""
    n_after = len(optimizer.param_groups)
    if n_after == n_before:
        return []
    if sources is None:
        sources = source_groups(optimizer, n_before) if n_after > n_before else []
    changed: list[str] = []
    for scheduler in schedulers_of(trainer, optimizer):
        changed += resize_scheduler(scheduler, n_before, n_after, sources)
    return changed


def param_layout(optimizer: torch.optim.Optimizer, module: nn.Module) -> list[list[str]] | None:
    """The optimizer's parameter groups as lists of parameter names (``None`` if a parameter has no name)."""
    names = {id(p): n for n, p in module.named_parameters()}
    layout = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    return None if any(n is None for names_ in layout for n in names_) else layout  # type: ignore[return-value]


def regroup(optimizer: torch.optim.Optimizer, module: nn.Module, layout: list[list[str]]) -> tuple[int, list[int]] | None:
    """Rebuild the optimizer's groups as ``layout`` (parameter names per group, as saved with a checkpoint).

    For a resumed run whose ``configure_optimizers`` put the parameters that fixes added into the
    user's groups, while the saved optimizer kept them in groups of their own: its saved state can
    only be loaded into the same layout. Hyperparameters come from the saved state when it loads.

    Returns:
        ``(groups before, source group of each added group)``, or ``None`` when nothing changed or the
        optimizer holds other parameters than the layout (left alone, with a warning).
    """
    current = param_layout(optimizer, module)
    if current == layout:
        return None
    flat_now = sorted(n for names in (current or []) for n in names)
    flat_saved = sorted(n for names in layout for n in names)
    if current is None or flat_now != flat_saved:
        log.warning("gradwatch: the optimizer's parameters differ from those saved in the checkpoint; its groups are "
                    "left as configure_optimizers built them")
        return None
    by_name = dict(module.named_parameters())
    holder = {n: i for i, names in enumerate(current) for n in names}
    groups = optimizer.param_groups
    rebuilt, sources = [], []
    for i, names in enumerate(layout):
        if i < len(groups):
            base, src = groups[i], i
        else:
            src = holder[names[0]] if names else 0
            base = groups[src]
            sources.append(src)
        group = {k: (v if i < len(groups) else copy.deepcopy(v)) for k, v in hyper(base).items()}
        group["params"] = [by_name[n] for n in names]
        if "param_names" in base:
            group["param_names"] = list(names)
        rebuilt.append(group)
    n_before = len(groups)
    optimizer.param_groups[:] = rebuilt
    return n_before, sources


__all__ = ["PER_GROUP_ATTRS", "fit_schedulers", "hyper", "param_layout", "regroup", "resize_scheduler",
           "schedulers_of", "source_groups"]
