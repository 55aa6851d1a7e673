"""``mixed_precision``: advice for fp16 gradients underflowing (a recommendation, never applied).

fp16 has a narrow range: gradients below about 6e-8 (6e-5 for normal numbers) become zero. The
GradScaler multiplies the loss by its scale so they stay representable; after overflows it halves
the scale, and a run that keeps overflowing somewhere ends with a scale so low that small gradients
underflow (the ``underflow`` finding). Two cures: start higher and grow back sooner
(``GradScaler(init_scale=..., growth_interval=...)``), or train in bfloat16, which has float32's
range and needs no loss scaling at all. gradwatch does not change the precision of a run itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradwatch.findings import Finding
from gradwatch.fixes.base import Fix, FixContext, Plan
from gradwatch.fixes.registry import register_fix


@register_fix
class MixedPrecision(Fix):
    """Recommend bfloat16 autocast, or a GradScaler that starts higher and grows back sooner."""

    name = "mixed_precision"
    effect = "advice"
    kinds = ("underflow",)
    why = {
        "underflow": "bfloat16 has float32's range (nothing underflows, no loss scaling needed); or a GradScaler "
                     "that starts higher and grows back sooner keeps small gradients representable",
    }

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        scale = finding.evidence.get("loss_scale")
        plan.recommend_only = True
        plan.details = {"loss_scale": scale}
        plan.reason = ("train in bfloat16 (float32's range, no loss scaling), or give the GradScaler a higher "
                       "init_scale and a shorter growth_interval so the scale recovers after overflows; gradwatch "
                       "does not change the precision itself")
        plan.imports = ["import torch"]
        plan.code = [
            "# either bfloat16 (no GradScaler needed):",
            "with torch.autocast(device_type='cuda', dtype=torch.bfloat16):",
            "    loss = loss_fn(model(inputs), targets)",
            "# or keep fp16 with a scaler that starts high and grows back sooner:",
            "scaler = torch.amp.GradScaler('cuda', init_scale=2.0**16, growth_interval=200)",
        ]
        return plan
