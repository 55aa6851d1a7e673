"""``snapshot`` / ``Snapshot.restore``: put a model and its optimizer back exactly as they were.

The auto-fix verification step applies a fix, trains on, and rolls the fix back if it made
things worse. Rolling back must undo structural changes (inserted modules, swapped
activations), restore every parameter and buffer bit for bit, and restore the optimizer's
state and param groups (groups added for new parameters disappear, removed parameters and
their moments come back). Parameters are restored *in place*: the same ``Parameter`` objects
as at snapshot time, so references held elsewhere (the optimizer, hooks, the watcher) stay
valid.

What is captured: for every module of the model, its child, parameter and buffer tables (the
module tree) and its train/eval flag; a copy of every parameter, buffer and gradient; the
optimizer's param groups (their parameter lists and hyperparameters) and per-parameter state;
and which :class:`~gradwatch.fixes.clipping.GradientClipper` objects were attached to the
optimizer, with their state. Memory: one extra copy of the parameters, buffers, gradients and
optimizer state (on their own devices).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch.fixes.clipping import GradientClipper, attached_clippers
from gradwatch.layers import unwrap_model


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


@dataclass
class _ModuleState:
    module: nn.Module
    modules: dict[str, nn.Module | None]
    parameters: dict[str, nn.Parameter | None]
    buffers: dict[str, torch.Tensor | None]
    training: bool


@dataclass
class Snapshot:
    """A restorable copy of a model (and optionally its optimizer); made by :func:`snapshot`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    _modules: list[_ModuleState] = field(repr=False)
    _values: list[tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    _grads: list[tuple[torch.Tensor, torch.Tensor | None]] = field(repr=False)
    _groups: list[dict[str, Any]] | None = field(default=None, repr=False)
    _state: dict[torch.Tensor, dict[str, Any]] | None = field(default=None, repr=False)
    _clippers: list[tuple[GradientClipper, dict[str, Any]]] | None = field(default=None, repr=False)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the model (tree, values, gradients, modes) and the optimizer back; can be called repeatedly."""
        for st in self._modules:
            st.module._modules.clear()
            st.module._modules.update(st.modules)
            st.module._parameters.clear()
            st.module._parameters.update(st.parameters)
            st.module._buffers.clear()
            st.module._buffers.update(st.buffers)
            st.module.training = st.training
        for tensor, saved in self._values:
            if tensor.shape == saved.shape and tensor.dtype == saved.dtype and tensor.device == saved.device:
                tensor.copy_(saved)
            else:
                tensor.data = saved.clone()
        for param, grad in self._grads:
            param.grad = None if grad is None else grad.clone()
        if self.optimizer is not None:
            self._restore_optimizer(self.optimizer)

    def _restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        assert self._groups is not None and self._state is not None and self._clippers is not None
        groups = []
        for g in self._groups:
            group = {k: (list(v) if k in ("params", "param_names") else _clone(v)) for k, v in g.items()}
            groups.append(group)
        optimizer.param_groups[:] = groups
        optimizer.state.clear()
        for p, s in self._state.items():
            optimizer.state[p] = {k: _clone(v) for k, v in s.items()}
        keep = {id(c) for c, _ in self._clippers}
        for clipper in attached_clippers(optimizer):
            if id(clipper) not in keep:
                clipper.remove()
        for clipper, clip_state in self._clippers:
            if not clipper.attached:
                clipper.attach(optimizer)
            clipper.load_state_dict(copy.deepcopy(clip_state))


@torch.no_grad()
def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, tree_only: bool = False) -> Snapshot:
    """Capture ``model`` (and ``optimizer``) so that ``.restore()`` puts them back bit for bit.

    Args:
        model: the model (wrappers are looked through).
        optimizer: its optimizer, restored with the model when given.
        tree_only: with ``True`` only the module tree and modes are captured (no copy of any tensor):
            enough to undo structural changes before a checkpoint overwrites every value anyway.

    Returns:
        A :class:`Snapshot`; call ``.restore()`` to roll back.

    Example:
        >>> snap = snapshot(model, optimizer)               # doctest: +SKIP
        >>> report = apply_fixes(model, diag, optimizer)    # doctest: +SKIP
        >>> snap.restore()                                  # the fix is gone  # doctest: +SKIP
    """
    inner = unwrap_model(model)
    states: list[_ModuleState] = []
    values: list[tuple[torch.Tensor, torch.Tensor]] = []
    grads: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    seen: set[int] = set()
    for module in inner.modules():
        states.append(
            _ModuleState(
                module=module,
                modules=dict(module._modules),
                parameters=dict(module._parameters),
                buffers=dict(module._buffers),
                training=module.training,
            )
        )
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tree_only or tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            values.append((tensor, tensor.detach().clone()))
            if isinstance(tensor, nn.Parameter):
                grads.append((tensor, None if tensor.grad is None else tensor.grad.detach().clone()))
    snap = Snapshot(model=inner, optimizer=optimizer, _modules=states, _values=values, _grads=grads)
    if optimizer is not None:
        snap._groups = [
            {k: (list(v) if k in ("params", "param_names") else _clone(v)) for k, v in g.items()}
            for g in optimizer.param_groups
        ]
        snap._state = {p: {k: _clone(v) for k, v in s.items()} for p, s in optimizer.state.items()}
        snap._clippers = [(c, c.state_dict()) for c in attached_clippers(optimizer)]
    return snap
