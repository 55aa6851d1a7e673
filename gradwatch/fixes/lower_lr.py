"""``lower_lr``: a recommendation only - lower the learning rate by a suggested factor.

gradwatch never changes the learning rate itself: the LR is entangled with the user's
schedule and scheduler state, and the right value is a training decision. The report gives
the factor and, with an optimizer, the current and suggested LR per group, plus the code.

The factor comes, in order, from the option, from ``evidence["lr_factor"]``, from
``evidence["update_to_weight"]`` (the typical relative step size; a healthy one is about
``1e-3``, so the factor brings it there, rounded down to 1, 2 or 5 times a power of ten and
kept in ``[1e-4, 0.5]``), and is ``0.1`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gradwatch.findings import Finding
from gradwatch.fixes.base import Fix, FixContext, Plan
from gradwatch.fixes.registry import register_fix

HEALTHY_UPDATE_TO_WEIGHT = 1e-3
DEFAULT_FACTOR = 0.1


def _round_down_125(x: float) -> float:
    exponent = math.floor(math.log10(x))
    for mantissa in (5.0, 2.0, 1.0):
        if mantissa * 10**exponent <= x * (1 + 1e-9):
            return mantissa * 10**exponent
    return 10**exponent  # pragma: no cover


def suggested_factor(evidence: dict[str, Any]) -> tuple[float, str]:
    """(factor, where it came from) for a finding's evidence."""
    factor = evidence.get("lr_factor")
    if isinstance(factor, int | float) and 0 < factor < 1:
        return float(factor), "evidence['lr_factor']"
    ratio = evidence.get("update_to_weight")
    if isinstance(ratio, int | float) and math.isfinite(ratio) and ratio > HEALTHY_UPDATE_TO_WEIGHT:
        raw = min(0.5, max(1e-4, HEALTHY_UPDATE_TO_WEIGHT / ratio))
        return _round_down_125(raw), f"evidence['update_to_weight']={ratio:.3g} brought to ~{HEALTHY_UPDATE_TO_WEIGHT:g}"
    return DEFAULT_FACTOR, "default"


@register_fix
class LowerLR(Fix):
    """Recommend multiplying the learning rate by a factor (never applied automatically).

    Args:
        factor: the factor, in ``(0, 1)``; default ``None`` derives it from the evidence.

    Raises:
        ValueError: ``factor`` outside ``(0, 1)``.
    """

    name = "lower_lr"
    effect = "advice"
    kinds = ("exploding", "nonfinite", "dead_units", "spike")
    why = {
        "exploding": "a smaller learning rate shrinks each update relative to the weights",
        "nonfinite": "a smaller learning rate keeps weights from overflowing; also check inputs and the loss for "
                     "NaN/inf",
        "dead_units": "large updates are the usual way units are knocked into the dead region",
        "spike": "a smaller peak learning rate (or a longer warm-up) keeps one bad batch from moving the weights "
                 "far; under Adam a spike after a quiet stretch meets a decayed second moment and is not damped",
    }

    def __init__(self, factor: float | None = None):
        if factor is not None and not 0.0 < float(factor) < 1.0:
            raise ValueError(f"lower_lr: factor={factor!r} must be in (0, 1)")
        self.factor = None if factor is None else float(factor)

    def options(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        factor, source = (self.factor, "option") if self.factor is not None else suggested_factor(finding.evidence)
        plan.recommend_only = True
        plan.details = {"factor": factor, "source": source}
        if ctx.optimizer is not None:
            lrs = [g.get("lr") for g in ctx.optimizer.param_groups]
            plan.details["current_lr"] = [float(lr) if lr is not None else None for lr in lrs]
            plan.details["suggested_lr"] = [float(lr) * factor if lr is not None else None for lr in lrs]
        why = {
            "dead_units": "large steps push ReLU units into the region where they never fire again",
            "spike": "a smaller peak learning rate (or a longer warm-up) keeps one spiking batch from moving the weights far",
        }.get(finding.kind, "steps far larger than the weights they update make training unstable")
        plan.reason = (
            f"multiply the learning rate by {factor:g} ({source}): {why}; gradwatch does not change the learning "
            "rate itself"
        )
        plan.code = [
            "for group in optimizer.param_groups:  # or lower the lr you pass to the optimizer / scheduler",
            f"    group['lr'] *= {factor!r}",
        ]
        return plan
