"""Tell a live optimizer about parameters a fix added, removed or re-initialised.

Never rebuild the optimizer: a new optimizer loses every other parameter's state (Adam's
moments, momentum buffers) and restarts LR schedules. New parameters join through
``optimizer.add_param_group`` (what Lightning's ``BaseFinetuning`` does) with the
hyperparameters of the group that held the layer they replace or wrap; removed parameters
leave their group together with their state. Emptied groups are kept (with no parameters) so
that group indices, which LR schedulers rely on, stay valid.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


def group_index(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int | None:
    """Index of the param group holding ``param`` (by identity), or ``None``."""
    for i, group in enumerate(optimizer.param_groups):
        if any(p is param for p in group["params"]):
            return i
    return None


def add_params(
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter],
    names: Sequence[str],
    like: Iterable[torch.Tensor],
) -> int | None:
    """Add ``params`` as a new group with the hyperparameters of the group holding one of ``like``.

    Returns:
        The new group's index, or ``None`` when none of ``like`` is in the optimizer (the layer
        was frozen or left out by the user, so its replacement stays out too).
    """
    if not params:
        return None
    source = None
    for ref in like:
        source = group_index(optimizer, ref)
        if source is not None:
            break
    if source is None:
        return None
    template = optimizer.param_groups[source]
    group = {k: copy.deepcopy(v) for k, v in template.items() if k not in ("params", "param_names")}
    group["params"] = list(params)
    if "param_names" in template:
        group["param_names"] = list(names)
    optimizer.add_param_group(group)
    log.debug("added %d parameters to optimizer group %d (copied from group %d)", len(params), len(optimizer.param_groups) - 1, source)
    return len(optimizer.param_groups) - 1


def remove_params(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Remove ``params`` (by identity) from their groups and drop their state; returns how many were held."""
    ids = {id(p) for p in params}
    removed = 0
    for group in optimizer.param_groups:
        keep = [i for i, p in enumerate(group["params"]) if id(p) not in ids]
        removed += len(group["params"]) - len(keep)
        if "param_names" in group:
            group["param_names"] = [group["param_names"][i] for i in keep]
        group["params"] = [group["params"][i] for i in keep]
    for p in [p for p in optimizer.state if id(p) in ids]:
        del optimizer.state[p]
    return removed


def reset_state_note(optimizer: torch.optim.Optimizer | None, params: list[torch.Tensor], changed: str) -> str:
    """Forget the optimizer state of parameters rewritten in place (``changed``: how); the report's note."""
    if optimizer is None:
        return "n/a: same parameter objects; no optimizer given (if it has state for them, reset it)"
    return f"state reset for {reset_state(optimizer, params)} of {len(params)} {changed} parameters (same objects)"


def reset_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Forget the optimizer state of ``params`` (re-created lazily at the next step); returns how many had state."""
    count = 0
    for p in params:
        if optimizer.state.pop(p, None) is not None:
            count += 1
    return count
