"""``clip_gradients``: install a :class:`~gradwatch.fixes.clipping.GradientClipper` on the optimizer.

Applies to ``exploding`` and ``nonfinite`` findings, never to vanishing ones (clipping caps
large gradients; it never lifts small ones) nor to dead or saturated units. Needs the
optimizer: the clipper is an optimizer step pre-hook, so it keeps working with no watcher and
no change to the training loop. Without one it refuses and gives the code to add instead.

Scope: norm and AutoClip clipping act on the *global* norm of all the optimizer's gradients,
not only on the layers the finding names: scaling some layers' gradients and not others would
change the direction of the update, which is exactly what global-norm clipping is designed not
to do. AGC is unit-wise, so it only bites where a unit's gradient is large relative to its
weights. Non-structural: no parameters change. The report lists the finding's layers for
reference; ``FixReport.clippers`` holds the live clipper (``.threshold`` to log, ``.remove()``).

Default: a fixed global norm of ``1.0``, the conventional threshold. AutoClip adapts to the
model's scale but cannot stop an explosion at the first step (its history is empty, so the
first step is never clipped) nor a persistent one (large norms drag the percentile up): on the
reference ``exploding_rnn`` (a first-step gradient norm of 1.9e4) norm-1.0 clipping ends at
0.002x the unclipped loss, AutoClip at 0.96x, AGC (lambda 0.01) at 1.09x. Choose
``mode="autoclip"`` for spikes in an otherwise healthy run; its history is seeded from
``evidence["total_norm_history"]`` when the diagnosis provides it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gradwatch.findings import Finding
from gradwatch.fixes.base import Fix, FixContext, Plan
from gradwatch.fixes.clipping import MODES, GradientClipper, attached_clippers
from gradwatch.fixes.record import Change
from gradwatch.fixes.registry import register_fix


@register_fix
class ClipGradients(Fix):
    """Global-norm, AutoClip or AGC clipping installed as an optimizer step pre-hook.

    Args:
        mode: ``"norm"`` (default), ``"autoclip"`` or ``"agc"``.
        max_norm: threshold for ``"norm"``; default ``None``: the finding's
            ``evidence["clip_threshold"]`` when it gives one (a spike finding: the run's own robust
            upper bound of the total norm, scale-free), else ``1.0``.
        percentile: AutoClip percentile (default ``10``).
        clip_factor: AGC ``lambda`` (default ``0.01``).
        window: AutoClip history length (default ``10_000``).
        attach: ``True`` (default) installs the clipper as the optimizer's step pre-hook; ``False``
            builds it unattached, in ``FixReport.clippers``, for a training framework that clips by
            itself (Lightning's ``gradient_clip_val``) and drives it with ``clipper.observe``.

    Raises:
        ValueError: unknown mode or bad values (checked by :class:`GradientClipper`).
    """

    name = "clip_gradients"
    effect = "training"
    kinds = ("exploding", "nonfinite", "spike")
    caps_gradients = True
    why_not = {"vanishing": "clipping caps large gradients; it never lifts vanishing ones"}
    why = {
        "exploding": "clipping caps the global gradient norm so one bad batch cannot blow up the weights",
        "nonfinite": "clipping caps the large gradients that usually precede inf/NaN",
        "spike": "clipping at the run's own robust upper bound of the total norm caps the spike and leaves "
                 "ordinary steps alone",
    }

    def __init__(
        self,
        mode: str = "norm",
        max_norm: float | None = None,
        percentile: float = 10.0,
        clip_factor: float = 0.01,
        window: int | None = 10_000,
        attach: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"clip_gradients: mode={mode!r}; allowed: {MODES}")
        self.mode = mode
        self.max_norm = max_norm
        self.percentile = percentile
        self.clip_factor = clip_factor
        self.window = window
        self.attach = bool(attach)
        self._build(1.0 if max_norm is None else max_norm, None)  # validate values now

    def options(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "max_norm": self.max_norm,
            "percentile": self.percentile,
            "clip_factor": self.clip_factor,
            "window": self.window,
            "attach": self.attach,
        }

    def _build(self, max_norm: float, history: Sequence[float] | None) -> GradientClipper:
        return GradientClipper(
            self.mode,
            max_norm=max_norm,
            percentile=self.percentile,
            history=history,
            window=self.window,
            clip_factor=self.clip_factor,
        )

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        evidence = finding.evidence
        threshold = evidence.get("clip_threshold")
        from_evidence = self.max_norm is None and isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0
        max_norm = float(threshold) if from_evidence else float(1.0 if self.max_norm is None else self.max_norm)
        history = evidence.get("total_norm_history") if self.mode == "autoclip" else None
        config: dict[str, Any] = {"mode": self.mode}
        if self.mode == "norm":
            config.update(max_norm=max_norm, max_norm_source="evidence['clip_threshold']" if from_evidence else "option")
            percentiles = evidence.get("total_norm_percentiles")
            if percentiles:
                config["observed_norm_percentiles"] = dict(percentiles)
        elif self.mode == "autoclip":
            config.update(percentile=self.percentile, seeded_history=len(history or ()))
        else:
            config.update(clip_factor=self.clip_factor)
        plan.details = {"clipper": config, "scope": "global (all the optimizer's parameters)"}
        plan.imports, plan.code = self._code(max_norm)
        if ctx.optimizer is None:
            plan.details["code_is_advice"] = True
            plan.reason = (
                "needs the optimizer to install its step pre-hook (pass optimizer=...); or add the code shown to "
                "your loop after backward() and before optimizer.step()"
            )
            return plan
        existing = attached_clippers(ctx.optimizer)
        if existing:
            plan.reason = f"a GradientClipper is already installed on this optimizer ({existing[0]!r})"
            return plan
        plan.targets = list(finding.layers) or ["(root)"]
        plan.private = {"max_norm": max_norm, "history": list(history or ())}
        why = {
            "autoclip": f"clip at the {self.percentile:g}th percentile of the gradient-norm history (AutoClip)",
            "norm": f"clip the global gradient norm at {max_norm:.4g}",
            "agc": f"clip each unit's gradient at {self.clip_factor:g} x its weight norm (AGC)",
        }[self.mode]
        plan.reason = f"{why}: caps the large gradients of a {finding.kind} finding before each optimizer step"
        if finding.kind == "nonfinite":
            plan.reason += "; steps with inf/NaN gradients are skipped"
        if evidence.get("optimizer_scale_invariant"):
            plan.reason += (
                " (note: the optimizer is invariant to gradient scale: clipping tames spikes but does not fix "
                "over-scaled weights)"
            )
        return plan

    def _code(self, max_norm: float) -> tuple[list[str], list[str]]:
        if self.mode == "norm":
            return ["import torch"], [
                "# after loss.backward(), before optimizer.step():",
                f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm!r})",
            ]
        args = f'"autoclip", percentile={self.percentile!r}' if self.mode == "autoclip" else f'"agc", clip_factor={self.clip_factor!r}'
        return ["from gradwatch.fixes import GradientClipper"], [
            f"clipper = GradientClipper({args}).attach(optimizer)  # clips before every optimizer.step()",
        ]

    def execute(self, ctx: FixContext, plan: Plan, change: Change) -> None:
        assert ctx.optimizer is not None
        clipper = self._build(plan.private["max_norm"], plan.private["history"])
        if self.attach:
            clipper.attach(ctx.optimizer)
        ctx.clippers.append(clipper)
        threshold = clipper.threshold
        change.details["clipper"]["threshold"] = threshold if math.isfinite(threshold) else None
        change.optimizer = (f"step pre-hook installed: {clipper!r}" if self.attach
                            else f"not attached (the training framework clips): {clipper!r}")
