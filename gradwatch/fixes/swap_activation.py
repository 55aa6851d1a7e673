"""``swap_activation``: replace saturating activation modules (Sigmoid/Tanh...) by the ReLU family.

Why: the derivative of a sigmoid is at most 1/4 (tanh: 1, and near 0 once saturated), so
the backward signal shrinks by a factor at every hidden layer; a ReLU passes it unchanged
where the unit is active. For dead ReLU units the swap goes the other way, to LeakyReLU, whose
negative side keeps a gradient so a unit can come back.

Targets, following the diagnosis contract:
    * ``vanishing``: ``evidence["activations"]`` (the hidden saturating modules implicated);
      without it, the saturating activation each of ``finding.layers`` feeds.
    * ``saturation`` / ``dead_units``: ``finding.layers`` (activation module names).

The output activation (one that runs after the last parameter layer) defines the model's
output range (probabilities, bounded regression) and is never swapped. A functional
activation (``torch.sigmoid`` in ``forward``) has no module to replace: the fix refuses and
says which ``forward`` to edit. Parameter-free: no optimizer change is needed. In
:func:`~gradwatch.fixes.apply_fixes`, ``he_init`` follows a swap onto the ReLU family for the
layers feeding the swapped modules (a ReLU stack initialised for sigmoid loses signal).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from gradwatch.findings import Finding
from gradwatch.fixes import ops
from gradwatch.fixes.base import Fix, FixContext, Plan
from gradwatch.fixes.registry import register_fix
from gradwatch.layers import SATURATING

#: ``to=`` choices: (class name in :data:`gradwatch.fixes.ops.ACTIVATIONS`, activation kind).
TARGETS: dict[str, tuple[str, str]] = {
    "relu": ("ReLU", "relu"),
    "leaky_relu": ("LeakyReLU", "leaky"),
    "gelu": ("GELU", "relu"),
    "silu": ("SiLU", "relu"),
    "elu": ("ELU", "relu"),
}
_FUNCTIONAL = re.compile(r"\b(?:torch|F|functional|nn\.functional)\.(sigmoid|tanh|hardtanh|hardsigmoid|softsign)\b|\.(sigmoid|tanh)\(\)")


def functional_hint(model: nn.Module) -> str:
    """Name the ``forward`` methods (of user classes in ``model``) that call sigmoid/tanh functionally."""
    found = []
    for cls in {type(m) for m in model.modules()}:
        if cls.__module__.startswith("torch."):
            continue
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        calls = sorted({a or b for a, b in _FUNCTIONAL.findall(source)})
        if calls:
            found.append(f"{cls.__name__}.forward calls {', '.join(calls)}")
    return "; ".join(sorted(found))


@register_fix
class SwapActivation(Fix):
    """Replace saturating activation modules by a ReLU-family module (LeakyReLU for dead units).

    Args:
        to: ``"relu" | "leaky_relu" | "gelu" | "silu" | "elu"``; default ``None`` picks
            ``"relu"``, or ``"leaky_relu"`` for a ``dead_units`` finding.
        negative_slope: slope of LeakyReLU's negative side (default ``0.01``).

    Raises:
        ValueError: ``to`` not among the choices above, or a negative slope outside ``(0, 1)``.
    """

    name = "swap_activation"
    effect = "structural"
    kinds = ("vanishing", "saturation", "dead_units")
    preflight = True
    why = {
        "vanishing": "saturating activations ({acts}) have derivatives <= 0.25 (sigmoid) or near 0 when saturated; "
                     "ReLU-family passes gradients unchanged for active units",
        "dead_units": "LeakyReLU keeps a small gradient for negative inputs, so units cannot die",
        "saturation": "ReLU-family activations do not saturate for positive inputs",
    }

    def __init__(self, to: str | None = None, negative_slope: float = 0.01):
        if to is not None and to not in TARGETS:
            raise ValueError(f"swap_activation: to={to!r}; allowed: {tuple(TARGETS)} (or None: relu, leaky_relu for dead units)")
        if not 0.0 < float(negative_slope) < 1.0:
            raise ValueError(f"swap_activation: negative_slope={negative_slope!r} must be in (0, 1)")
        self.to = to
        self.negative_slope = float(negative_slope)

    def options(self) -> dict[str, Any]:
        return {"to": self.to, "negative_slope": self.negative_slope}

    def target_for(self, finding: Finding) -> str:
        return self.to or ("leaky_relu" if finding.kind == "dead_units" else "relu")

    def _candidates(self, ctx: FixContext, finding: Finding) -> list[str]:
        if finding.kind == "vanishing":
            named = finding.evidence.get("activations")
            if named:
                return [str(n) for n in named]
            found = [ctx.topology.following_activation(layer) for layer in finding.layers]
            return [n for n in dict.fromkeys(found) if n is not None]
        return list(finding.layers)

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        to = self.target_for(finding)
        cls_name, new_kind = TARGETS[to]
        kwargs = {"negative_slope": self.negative_slope} if cls_name == "LeakyReLU" else {}
        candidates = list(targets) if targets is not None else self._candidates(ctx, finding)
        topo = ctx.topology
        outputs = topo.output_activations()
        for name, module in self.untreated_modules(ctx, candidates, plan, "already swapped by an earlier fix"):
            kind = ctx.activation_kind(name)
            if topo.observed and not topo.ran(name):
                plan.refused[name] = "did not run in the observed forward pass"
            elif (topo.calls(name) or 1) > 1:
                plan.refused[name] = (
                    f"runs {topo.calls(name)} times in forward(): one module shared by several positions (perhaps the "
                    "output too); give each position its own module first"
                )
            elif name in outputs:
                plan.refused[name] = (
                    f"{type(module).__name__} runs after the last parameter layer: it defines the model's output range, "
                    "so it is left alone"
                )
            elif finding.kind == "dead_units" and kind != "relu":
                plan.refused[name] = f"{type(module).__name__} is not a ReLU-family activation that can die"
            elif finding.kind != "dead_units" and not (isinstance(module, SATURATING) and kind in ("sigmoid", "tanh", "hard")):
                plan.refused[name] = f"{type(module).__name__} is not a saturating activation"
            else:
                plan.targets.append(name)
                plan.ops.append(
                    {"op": "replace_activation", "path": ctx.path(name), "new": cls_name, "kwargs": dict(kwargs)}
                )
        plan.details = {"to": cls_name, "kind": new_kind}
        if not plan.targets:
            plan.reason = self._refusal(ctx, finding, candidates, plan.refused)
            return plan
        swapped = sorted({type(ctx.modules[n]).__name__ for n in plan.targets})
        if finding.kind == "dead_units":
            plan.reason = f"{'/'.join(swapped)} -> {cls_name}: a negative slope keeps a gradient, so dead units can recover"
        else:
            plan.reason = (
                f"{'/'.join(swapped)} -> {cls_name}: saturating activations multiply the backward signal by at most "
                "their small derivative at every layer; the ReLU family passes it unchanged where active"
            )
        plan.code = [line for op in plan.ops for line in ops.code(op, ctx.model)]
        plan.imports = ["from torch import nn"]
        return plan

    def _refusal(self, ctx: FixContext, finding: Finding, candidates: list[str], refused: dict[str, str]) -> str:
        if refused:
            return "no activation module it can swap: " + "; ".join(f"{n}: {r}" for n, r in refused.items())
        hint = functional_hint(ctx.model)
        layers = ", ".join(finding.layers) or "-"
        if hint:
            return (
                f"no activation module follows {layers}: the activation is functional ({hint}), so there is no module "
                "to replace; edit forward() to call torch.relu (or F.leaky_relu) instead"
            )
        return (
            f"no saturating activation module follows {layers} in the forward pass; if forward() applies one "
            "functionally (torch.sigmoid / torch.tanh), edit it to call torch.relu instead"
        )

    def commit(self, ctx: FixContext, plan: Plan) -> None:
        super().commit(ctx, plan)
        for name in plan.targets:
            ctx.swapped(name, plan.details["kind"])
