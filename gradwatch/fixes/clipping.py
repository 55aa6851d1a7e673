"""Gradient clipping that lives on the optimizer: fixed global norm, AutoClip, and AGC.

The maths is in plain functions (:func:`global_norm`, :func:`clip_to_norm_`,
:func:`autoclip_threshold`, :func:`unitwise_norm`, :func:`agc_`); :class:`GradientClipper` holds
the state (mode, history of norms) and installs itself with
``optimizer.register_step_pre_hook`` so it runs right before every ``optimizer.step()`` with no
watcher and no change to the training loop; ``clipper.remove()`` takes it off again.

Modes:
    ``"norm"``: scale all gradients down when their global L2 norm exceeds ``max_norm``
        (Pascanu et al. 2013), exactly ``torch.nn.utils.clip_grad_norm_``.
    ``"autoclip"``: the threshold is the ``percentile``-th percentile of the history of global
        norms seen so far, the current one included (AutoClip, Seetharaman et al. 2020): it adapts
        to the model's own scale, so there is no threshold to tune.
    ``"agc"``: unit-wise adaptive clipping (AGC, Brock et al. 2021): each output unit's gradient
        row is scaled down when its norm exceeds ``clip_factor`` times the norm of that unit's
        weights (floored at ``eps``), so no step can move a unit by more than a fixed fraction of
        its own size.

Clipping caps *large* gradients. It never lifts vanishing ones, and it cannot cure an
Adam-trained model whose weights are over-scaled (Adam is invariant to gradient scale).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from gradwatch.ratelimit import RepeatedLog

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("autoclip", "norm", "agc")

_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[GradientClipper]] = weakref.WeakKeyDictionary()


def attached_clippers(optimizer: torch.optim.Optimizer) -> list[GradientClipper]:
    """The :class:`GradientClipper` objects currently installed on ``optimizer``."""
    return list(_ATTACHED.get(optimizer, []))


def _grads(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def global_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all ``grads`` together, computed with batched ops on their devices (no host sync)."""
    if not grads:
        return torch.zeros(())
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    first = grads[0].device
    norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)).float()).to(first) for gs in by_device.values()]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_to_norm_(grads: Sequence[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale ``grads`` in place by ``min(1, max_norm / (total_norm + 1e-6))`` (as ``clip_grad_norm_``)."""
    if not grads:
        return
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), gs in by_device.items():
        torch._foreach_mul_(gs, coef.to(device=device, dtype=dtype))


def autoclip_threshold(history: Sequence[float], percentile: float) -> float:
    """The ``percentile``-th percentile (linear interpolation, as ``numpy.percentile``) of ``history``;
    ``inf`` (no clipping) for an empty history."""
    if len(history) == 0:
        return math.inf
    return float(np.percentile(np.asarray(history, dtype=np.float64), percentile))


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm per output unit: over all dimensions but the first (whole tensor for vectors and scalars)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def agc_(parameters: Iterable[torch.Tensor], clip_factor: float = 0.01, eps: float = 1e-3) -> int:
    """Adaptive gradient clipping in place: ``||g_i|| <= clip_factor * max(||w_i||, eps)`` per unit ``i``.

    Returns:
        How many tensors had at least one unit clipped.
    """
    clipped = 0
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp(min=eps).mul(clip_factor)
        grad_norm = unitwise_norm(p.grad)
        over = grad_norm > max_norm
        scale = torch.where(over, max_norm / grad_norm.clamp(min=1e-6), torch.ones_like(grad_norm))
        p.grad.mul_(scale.to(p.grad.dtype))
        clipped += int(bool(over.any()))
    return clipped


class GradientClipper:
    """Clips gradients right before every ``optimizer.step()`` (an optimizer step pre-hook).

    Args:
        mode: ``"norm"`` (default), ``"autoclip"`` or ``"agc"`` (see the module docstring).
        max_norm: the fixed threshold for ``"norm"`` (default ``1.0``).
        percentile: AutoClip's percentile of the norm history, in ``[0, 100]`` (default ``10``,
            the paper's recommendation).
        history: global norms seen before (e.g. from the watcher), seeding AutoClip's history.
        window: keep at most this many recent norms (default ``10_000``; ``None``: unbounded).
        clip_factor: AGC's ``lambda`` (default ``0.01``, the NFNet value).
        eps: AGC's floor on weight norms (default ``1e-3``).
        skip_nonfinite: when the global norm is inf/NaN, drop every gradient (set ``.grad`` to
            ``None``) so the optimizer skips the step, as ``GradScaler`` does; default ``True``.
            Otherwise non-finite gradients pass through.

    Raises:
        ValueError: a bad mode or value, naming it and the allowed ones.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> clipper = GradientClipper(mode="norm", max_norm=1.0).attach(opt)
        >>> clipper.threshold
        1.0
        >>> clipper.remove()
    """

    def __init__(
        self,
        mode: str = "norm",
        *,
        max_norm: float = 1.0,
        percentile: float = 10.0,
        history: Sequence[float] | None = None,
        window: int | None = 10_000,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        skip_nonfinite: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"GradientClipper: mode={mode!r}; allowed: {MODES}")
        if mode == "norm" and (not max_norm > 0 or not math.isfinite(max_norm)):
            raise ValueError(f"GradientClipper: mode='norm' needs a finite max_norm > 0, got {max_norm!r}")
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"GradientClipper: percentile={percentile!r} must be in [0, 100]")
        if window is not None and window < 1:
            raise ValueError(f"GradientClipper: window={window!r} must be >= 1 or None")
        if not clip_factor > 0 or not eps > 0:
            raise ValueError(f"GradientClipper: clip_factor={clip_factor!r} and eps={eps!r} must be > 0")
        self.mode = mode
        self.max_norm = float(max_norm)
        self.percentile = float(percentile)
        self.window = window
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.history: deque[float] = deque((float(v) for v in history or () if math.isfinite(float(v))), maxlen=window)
        self.steps = 0
        self.clipped_steps = 0
        self.skipped_steps = 0
        #: Global gradient norm seen by the last call, before clipping (``None`` before the first).
        self.last_norm: float | None = None
        self._threshold = self._current_threshold()
        self._optimizer: weakref.ReferenceType[torch.optim.Optimizer] | None = None
        self._handle: RemovableHandle | None = None
        self._repeated = RepeatedLog(log)
        self._retired = False

    def _current_threshold(self) -> float:
        if self.mode == "norm":
            return self.max_norm
        if self.mode == "agc":
            return self.clip_factor
        return autoclip_threshold(self.history, self.percentile)

    @property
    def threshold(self) -> float:
        """The threshold in force: ``max_norm``, the AutoClip percentile value (``inf`` before any
        history), or AGC's ``clip_factor`` (a ratio of gradient to weight norm). Log it."""
        return self._threshold

    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain data (without the history)."""
        return {
            "mode": self.mode,
            "max_norm": self.max_norm,
            "percentile": self.percentile,
            "window": self.window,
            "clip_factor": self.clip_factor,
            "eps": self.eps,
            "skip_nonfinite": self.skip_nonfinite,
        }

    @torch.no_grad()
    def clip_(self, parameters: Iterable[torch.Tensor]) -> float:
        """Clip the gradients of ``parameters`` once; returns their global norm *before* clipping.

        One host synchronisation per call (the norm is needed on the host for the history and the
        non-finite check).
        """
        params = list(parameters)
        grads = _grads(params)
        self.steps += 1
        if not grads:
            self.last_norm = 0.0
            return 0.0
        total = global_norm(grads)
        norm = float(total)
        self.last_norm = norm
        if not math.isfinite(norm):
            if self.skip_nonfinite:
                for p in params:
                    p.grad = None
                self.skipped_steps += 1
                self._repeated("nonfinite", "gradwatch clip: non-finite gradient norm %s; step skipped (gradients dropped)", norm)
            return norm
        if self.mode == "agc":
            if agc_(params, self.clip_factor, self.eps):
                self.clipped_steps += 1
            return norm
        if self.mode == "autoclip":
            self.history.append(norm)
        self._threshold = self._current_threshold()
        if norm > self._threshold:
            clip_to_norm_(grads, self._threshold, total)
            self.clipped_steps += 1
        return norm

    @torch.no_grad()
    def observe(self, parameters: Iterable[torch.Tensor]) -> float:
        """Record the global norm of the gradients of ``parameters`` without clipping; returns it.

        For a training framework that clips by itself (Lightning's ``gradient_clip_val``): AutoClip's
        history and :attr:`threshold` follow the norms it sees, and the framework clips at the threshold.
        """
        grads = _grads(parameters)
        norm = float(global_norm(grads)) if grads else 0.0
        self.last_norm = norm
        if self.mode == "autoclip" and grads and math.isfinite(norm):
            self.history.append(norm)
        self._threshold = self._current_threshold()
        return norm

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._retired:
            return
        self.clip_(p for group in optimizer.param_groups for p in group["params"])

    def retire(self) -> None:
        """Stop clipping now, from anywhere - also from inside an optimizer step pre-hook (the auto-fixer
        rolling clipping back), where removing a hook would break the optimizer's loop over its hooks:
        the hook stays registered as a no-op until :meth:`remove`."""
        self._retired = True
        optimizer = self._optimizer() if self._optimizer is not None else None
        if optimizer is not None and optimizer in _ATTACHED:
            _ATTACHED[optimizer] = [c for c in _ATTACHED[optimizer] if c is not self]

    def attach(self, optimizer: torch.optim.Optimizer) -> GradientClipper:
        """Install on ``optimizer`` (a step pre-hook); returns ``self`` for chaining.

        Raises:
            RuntimeError: already attached (to this or another optimizer).
        """
        if self._handle is not None:
            raise RuntimeError("this GradientClipper is already attached; remove() it first")
        self._handle = optimizer.register_step_pre_hook(self._hook)
        self._optimizer = weakref.ref(optimizer)
        _ATTACHED.setdefault(optimizer, []).append(self)
        return self

    @property
    def attached(self) -> bool:
        return self._handle is not None and not self._retired

    def remove(self) -> None:
        """Take the hook off the optimizer (idempotent)."""
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        optimizer = self._optimizer() if self._optimizer is not None else None
        if optimizer is not None and optimizer in _ATTACHED:
            _ATTACHED[optimizer] = [c for c in _ATTACHED[optimizer] if c is not self]
        self._optimizer = None

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (config, history, counters) for checkpoints."""
        return {
            **self.config(),
            "history": list(self.history),
            "steps": self.steps,
            "clipped_steps": self.clipped_steps,
            "skipped_steps": self.skipped_steps,
            "last_norm": self.last_norm,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (missing keys keep their current values)."""
        self.history = deque((float(v) for v in state.get("history", self.history)), maxlen=self.window)
        self.steps = int(state.get("steps", self.steps))
        self.clipped_steps = int(state.get("clipped_steps", self.clipped_steps))
        self.skipped_steps = int(state.get("skipped_steps", self.skipped_steps))
        self.last_norm = state.get("last_norm", self.last_norm)
        self._threshold = self._current_threshold()

    def __repr__(self) -> str:
        return f"GradientClipper(mode={self.mode!r}, threshold={self.threshold:.4g}, attached={self.attached})"
