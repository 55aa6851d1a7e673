"""``rescale_residual``: scale (by default zero) the last layer of each residual branch, in place.

Why: in a residual stack without normalisation, every block adds its branch to the stream it
was computed from, so the stream's variance multiplies by ``1 + branch gain`` per block: a
branch at He scale triples it, ``3**32`` over 32 blocks, and SGD diverges at its first step.
Zero-initialising the last layer of every branch makes each block the identity at the start
(SkipInit, De & Smith 2020; the last layer of Fixup, Zhang et al. 2019; zero-gamma, Goyal et al.
2017), so the stream keeps the input's scale at any depth; the branches then grow from zero as
they learn. ``scale > 0`` multiplies the layer's weights instead (e.g. ``num_blocks ** -0.5``).

Targets: only the layers the diagnosis measured as the last layer of a residual branch
(``finding.evidence["residual_growth"]["branch_last_layers"]``: the layer just before each
measured addition), never a guess: zeroing a layer that is *not* followed by a skip connection
would cut the network. Linear/Conv layers only. In place: the same ``Parameter`` objects
(``p.mul_``, bias zeroed), the optimizer's state for them reset; the report holds each layer's
weight RMS before and after, and a :func:`~gradwatch.fixes.snapshot` undoes it bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradwatch.findings import Finding
from gradwatch.fixes import optim as optim_mod
from gradwatch.fixes import paths
from gradwatch.fixes.base import Fix, FixContext, Plan, number_option
from gradwatch.fixes.record import Change
from gradwatch.fixes.registry import register_fix

SCALABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


def branch_last_layers(finding: Finding) -> list[str]:
    """The residual branches' last layers the diagnosis measured (empty when it measured none)."""
    growth = finding.evidence.get("residual_growth") or {}
    return [str(n) for n in growth.get("branch_last_layers", ())]


@register_fix
class RescaleResidual(Fix):
    """Multiply the last layer of each measured residual branch by ``scale`` (default 0: zero init).

    Args:
        scale: factor for the weights (``0.0``, the default, zero-initialises them); biases are
            zeroed either way. Must be in ``[0, 1)``: the fix shrinks branches, it never grows them.

    Raises:
        ValueError: ``scale`` outside ``[0, 1)``.
    """

    name = "rescale_residual"
    effect = "weights"
    kinds = ("exploding", "nonfinite")
    preflight = True
    why = {
        "exploding": "zero-initialising the last layer of each residual branch makes every block start as the "
                     "identity, so the stream keeps its scale at any depth (SkipInit/Fixup)",
        "nonfinite": "the non-finite values follow a forward signal that multiplies through residual additions; "
                     "zero-initialising each branch's last layer removes that growth (SkipInit/Fixup)",
    }

    def __init__(self, scale: float = 0.0):
        self.scale = number_option("rescale_residual: scale", scale, 0.0, 1.0, low_open=False, high_open=True)

    def options(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        names = list(targets) if targets is not None else branch_last_layers(finding)
        layers: dict[str, Any] = {}
        for name, module in self.untreated_modules(ctx, names, plan, "already rescaled by an earlier fix"):
            if not isinstance(module, SCALABLE):
                plan.refused[name] = f"{type(module).__name__} is not a Linear/Conv layer"
            else:
                plan.targets.append(name)
                w = module.weight.detach().float()
                layers[name] = {"rms_before": float(w.square().mean().sqrt()), "scale": self.scale}
                where = paths.expr(ctx.path(name), ctx.model)
                plan.code.append(f"{where}.weight.mul_({self.scale!r})" if self.scale else f"{where}.weight.zero_()")
                if getattr(module, "bias", None) is not None:
                    plan.code.append(f"{where}.bias.zero_()")
        plan.details = {"layers": layers}
        if not plan.targets:
            plan.reason = "no residual branch to rescale: " + plan.refusals(
                "the finding names no residual branch (the diagnosis lists them when it measures additions "
                "that make the forward signal grow)")
            return plan
        plan.code = ["with torch.no_grad():"] + [f"    {line}" for line in plan.code]
        plan.imports = ["import torch"]
        what = "zero-initialise" if not self.scale else f"multiply by {self.scale:g}"
        plan.reason = (f"{what} the last layer of {len(plan.targets)} residual branches (biases zeroed): each block "
                       "starts close to the identity, so the stream no longer multiplies block after block")
        return plan

    @torch.no_grad()
    def execute(self, ctx: FixContext, plan: Plan, change: Change) -> None:
        params: list[torch.Tensor] = []
        for name in plan.targets:
            module = self.module_now(ctx, name)
            module.weight.mul_(self.scale)
            params.append(module.weight)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
                params.append(module.bias)
            plan.details["layers"][name]["rms_after"] = float(module.weight.float().square().mean().sqrt())
        change.optimizer = optim_mod.reset_state_note(ctx.optimizer, params, "rescaled")
