"""``skip_spikes`` (opt-in): skip the optimizer update on a step whose gradient norm is a spike.

Installs a :class:`SpikeSkipper` as an optimizer step pre-hook. It keeps the log10 global gradient
norms of the last ``window`` steps and, when a step's norm is both ``z`` robust deviations
(1.4826 x MAD) and ``ratio`` times above their median (the ``spike`` rule's test, see
:mod:`gradwatch.spikes`), drops every gradient (``.grad = None``): optimizers skip parameters without
a gradient, so no weight moves and no optimizer state (Adam's moments and step count, momentum)
changes - the step simply did not happen for them. A learning-rate scheduler still steps.

It never skips more than ``max_consecutive`` steps in a row: a norm that stays high is a new regime
(or a divergence for other findings to name), not a spike, and skipping it forever would stop
training. Every skip is recorded (``skipped``: step, norm, median) and logged once, then counted.

Opt-in: the default policy of :func:`~gradwatch.fixes.apply_fixes` (and ``auto_fix=True``) never
applies it; name it (``only=["skip_spikes"]``, ``auto_fix=["skip_spikes"]``) to use it.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gradwatch.findings import Finding
from gradwatch.fixes.base import Fix, FixContext, Plan
from gradwatch.fixes.clipping import global_norm
from gradwatch.fixes.record import Change
from gradwatch.fixes.registry import register_fix
from gradwatch.ratelimit import RepeatedLog

log = logging.getLogger(__name__)

_MAD_TO_SIGMA = 1.4826
_MAD_FLOOR_DECADES = 0.05


class SpikeSkipper:
    """Drops the gradients of spike steps right before ``optimizer.step()`` (so the update is skipped).

    Args:
        z: robust deviations above the trailing median (default ``6``).
        ratio: and at least this many times the trailing median (default ``10``).
        window: trailing steps in the baseline (default ``50``).
        min_baseline: no step is judged before this many norms were seen (default ``20``).
        max_consecutive: at most this many steps skipped in a row (default ``3``).

    Raises:
        ValueError: a value out of range, naming it.
    """

    def __init__(self, z: float = 6.0, ratio: float = 10.0, window: int = 50, min_baseline: int = 20,
                 max_consecutive: int = 3):
        if not z > 0 or not ratio > 1:
            raise ValueError(f"SpikeSkipper: z={z!r} must be > 0 and ratio={ratio!r} > 1")
        if not (isinstance(window, int) and isinstance(min_baseline, int) and 1 <= min_baseline <= window):
            raise ValueError(f"SpikeSkipper: need integers 1 <= min_baseline ({min_baseline!r}) <= window ({window!r})")
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"SpikeSkipper: max_consecutive={max_consecutive!r} must be an integer >= 1")
        self.z, self.ratio, self.window, self.min_baseline = float(z), float(ratio), window, min_baseline
        self.max_consecutive = max_consecutive
        self.history: deque[float] = deque(maxlen=window)
        self.steps = 0
        self.skipped: list[dict[str, float]] = []
        self._run = 0
        self._handle: Any = None
        self._optimizer: weakref.ReferenceType[torch.optim.Optimizer] | None = None
        self._repeated = RepeatedLog(log)
        self._retired = False

    @property
    def threshold(self) -> float:
        """The global norm above which the next step would be skipped (``inf`` before the baseline)."""
        if len(self.history) < self.min_baseline:
            return math.inf
        logs = np.asarray(self.history)
        med = float(np.median(logs))
        sig = max(_MAD_TO_SIGMA * float(np.median(np.abs(logs - med))), _MAD_FLOOR_DECADES)
        return float(10 ** (med + max(self.z * sig, math.log10(self.ratio))))

    def is_spike(self, norm: float) -> tuple[bool, float]:
        """Whether ``norm`` is a spike against the history, and the history's median (NaN if too short)."""
        if len(self.history) < self.min_baseline or not (math.isfinite(norm) and norm > 0):
            return False, math.nan
        logs = np.asarray(self.history)
        med = float(np.median(logs))
        sig = max(_MAD_TO_SIGMA * float(np.median(np.abs(logs - med))), _MAD_FLOOR_DECADES)
        x = math.log10(norm)
        return (x - med >= self.z * sig and x - med >= math.log10(self.ratio)), 10 ** med

    @torch.no_grad()
    def check_(self, parameters: Sequence[torch.Tensor]) -> bool:
        """Judge the current gradients; drop them (returns ``True``) on a spike. One host sync."""
        params = list(parameters)
        grads = [p.grad for p in params if p.grad is not None]
        self.steps += 1
        if not grads:
            return False
        norm = float(global_norm(grads))
        spike, median = self.is_spike(norm)
        if spike and self._run < self.max_consecutive:
            for p in params:
                p.grad = None
            self._run += 1
            self.skipped.append({"call": self.steps - 1, "norm": norm, "median": median})
            self._repeated("skip", "gradwatch skip_spikes: gradient norm %.3g is %.3gx the recent median; update skipped",
                           norm, norm / median)
            return True
        self._run = 0
        if math.isfinite(norm) and norm > 0:
            self.history.append(math.log10(norm))
        return False

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._retired:
            return
        self.check_([p for group in optimizer.param_groups for p in group["params"]])

    def attach(self, optimizer: torch.optim.Optimizer) -> SpikeSkipper:
        """Install on ``optimizer`` (a step pre-hook); returns ``self``."""
        if self._handle is not None:
            raise RuntimeError("this SpikeSkipper is already attached; remove() it first")
        self._handle = optimizer.register_step_pre_hook(self._hook)
        self._optimizer = weakref.ref(optimizer)
        return self

    @property
    def attached(self) -> bool:
        return self._handle is not None and not self._retired

    def retire(self) -> None:
        """Stop skipping now, also from inside an optimizer step pre-hook (see ``GradientClipper.retire``)."""
        self._retired = True

    def remove(self) -> None:
        """Take the hook off the optimizer (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __repr__(self) -> str:
        return f"SpikeSkipper(z={self.z:g}, ratio={self.ratio:g}, skipped={len(self.skipped)}, attached={self._handle is not None})"


@register_fix
class SkipSpikes(Fix):
    """Opt-in: skip the update of spike steps (see the module docstring).

    Args: as :class:`SpikeSkipper`.
    """

    name = "skip_spikes"
    effect = "training"
    kinds = ("spike",)
    why = {
        "spike": "opt-in: skip the optimizer update on a step whose gradient norm is a spike (optimizer state "
                 "untouched, every skip recorded)",
    }
    opt_in = True

    def __init__(self, z: float = 6.0, ratio: float = 10.0, window: int = 50, min_baseline: int = 20,
                 max_consecutive: int = 3):
        SpikeSkipper(z, ratio, window, min_baseline, max_consecutive)  # validate now
        self._options = {"z": z, "ratio": ratio, "window": window, "min_baseline": min_baseline,
                         "max_consecutive": max_consecutive}

    def options(self) -> dict[str, Any]:
        return dict(self._options)

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        plan.imports = ["from gradwatch.fixes.skip_spikes import SpikeSkipper"]
        plan.code = [f"skipper = SpikeSkipper({', '.join(f'{k}={v!r}' for k, v in self._options.items())}).attach(optimizer)"]
        if ctx.optimizer is None:
            plan.reason = "needs the optimizer to install its step pre-hook (pass optimizer=...)"
            return plan
        plan.targets = list(finding.layers) or ["(root)"]
        plan.details = {"skipper": dict(self._options), "scope": "global (all the optimizer's parameters)"}
        plan.reason = ("skip the optimizer update on steps whose global gradient norm is a spike (optimizer state "
                       "untouched; at most max_consecutive in a row; each skip recorded)")
        return plan

    def execute(self, ctx: FixContext, plan: Plan, change: Change) -> None:
        assert ctx.optimizer is not None
        skipper = SpikeSkipper(**self._options).attach(ctx.optimizer)
        ctx.clippers.append(skipper)  # live hooks the report hands back (``.remove()``)
        change.optimizer = f"step pre-hook installed: {skipper!r}"
