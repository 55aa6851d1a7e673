"""``he_init``: re-initialise the affected Linear/Conv layers for the activation they feed.

Why: a layer whose weights are far above (exploding) or below (vanishing) the scale that keeps
the signal's variance constant through its activation multiplies the problem at every layer.
Kaiming/He (He et al. 2015) keeps the variance through ReLU-family activations
(``std = gain / sqrt(fan_in)``, gain ``sqrt(2)``); Xavier/Glorot (Glorot & Bengio 2010) does so
for tanh/sigmoid, used when such an activation is kept; a layer feeding no activation (an output
layer) gets LeCun scale (gain 1). Biases are zeroed, which also revives ReLU units killed by a
very negative bias. Re-initialising cannot cure a model whose trouble is a saturating activation
it keeps: for that, ``swap_activation`` comes first and ``he_init`` follows it.

Targets: ``finding.layers`` (vanishing / exploding), ``evidence["feeding_layers"]``
(dead_units / saturation). In place: the same ``Parameter`` objects get new values
(``with torch.no_grad(): p.copy_(...)``), so every reference (optimizer, hooks) stays valid;
with an optimizer, the state of those parameters (Adam's moments, momentum) is reset,
because moments of the old weights mean nothing for the new ones. Draws from torch's global RNG:
seed it for reproducible (and, under DDP, identical) weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradwatch.findings import Finding
from gradwatch.fixes import optim as optim_mod
from gradwatch.fixes import paths
from gradwatch.fixes.base import Fix, FixContext, Plan, target_layers
from gradwatch.fixes.record import Change
from gradwatch.fixes.registry import register_fix

INITIALISABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
NONLINEARITIES: tuple[str, ...] = ("auto", "relu", "leaky_relu", "tanh", "sigmoid", "linear")


def _scheme(kind: str | None, negative_slope: float) -> tuple[str, dict[str, Any], float]:
    """(init function, its kwargs, gain) for an activation kind."""
    if kind == "relu":
        return "kaiming_normal_", {"mode": "fan_in", "nonlinearity": "relu"}, math.sqrt(2.0)
    if kind == "leaky":
        gain = nn.init.calculate_gain("leaky_relu", negative_slope)
        return "kaiming_normal_", {"a": negative_slope, "mode": "fan_in", "nonlinearity": "leaky_relu"}, gain
    if kind in ("tanh", "hard"):
        gain = nn.init.calculate_gain("tanh")
        return "xavier_normal_", {"gain": gain}, gain
    if kind == "sigmoid":
        return "xavier_normal_", {"gain": 1.0}, 1.0
    return "kaiming_normal_", {"mode": "fan_in", "nonlinearity": "linear"}, 1.0


def _kwargs_code(kwargs: dict[str, Any]) -> str:
    return "".join(f", {k}={v!r}" for k, v in kwargs.items())


@register_fix
class HeInit(Fix):
    """Kaiming (ReLU family) or Xavier (tanh/sigmoid kept) re-initialisation, biases zeroed, in place.

    Args:
        nonlinearity: ``"auto"`` (default: from the activation each layer feeds in the observed
            forward pass) or one of ``"relu" | "leaky_relu" | "tanh" | "sigmoid" | "linear"`` for all
            targets.
        negative_slope: LeakyReLU slope used for the gain when a layer feeds a LeakyReLU
            (default: the module's own slope, else ``0.01``).

    Raises:
        ValueError: ``nonlinearity`` not among the choices above.
    """

    name = "he_init"
    effect = "weights"
    kinds = ("vanishing", "exploding", "dead_units", "saturation")
    preflight = True
    why = {
        "vanishing": "re-initialise at He/Xavier scale so each layer preserves signal variance forward and backward",
        "exploding": "the weights are {scale:.1f}x the He scale: re-initialising removes the cause (clipping would "
                     "only mask it)",
        "dead_units": "re-initialising the feeding layer (biases zeroed) revives units whose pre-activation is negative"
                      " for every input",
        "saturation": "Xavier-scale weights keep pre-activations of sigmoid/tanh near their linear range",
    }

    def __init__(self, nonlinearity: str = "auto", negative_slope: float | None = None):
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"he_init: nonlinearity={nonlinearity!r}; allowed: {NONLINEARITIES}")
        self.nonlinearity = nonlinearity
        self.negative_slope = negative_slope

    def options(self) -> dict[str, Any]:
        return {"nonlinearity": self.nonlinearity, "negative_slope": self.negative_slope}

    def _kind_for(self, ctx: FixContext, layer: str) -> tuple[str | None, str | None, float]:
        """(activation kind, activation name, negative slope) the layer feeds."""
        forced = {"relu": "relu", "leaky_relu": "leaky", "tanh": "tanh", "sigmoid": "sigmoid", "linear": None}
        slope = self.negative_slope if self.negative_slope is not None else 0.01
        if self.nonlinearity != "auto":
            return forced[self.nonlinearity], None, slope
        act = ctx.topology.following_activation(layer)
        if act is None:
            return None, None, slope
        kind = ctx.activation_kind(act)
        if kind == "leaky" and self.negative_slope is None:
            module = ctx.current_module(act) or ctx.modules[act]
            slope = float(getattr(module, "negative_slope", 0.01))
        return kind, act, slope

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        names = list(targets) if targets is not None else target_layers(finding)
        layers: dict[str, Any] = {}
        for name, module in self.untreated_modules(ctx, names, plan,
                                                   "already re-initialised by an earlier fix"):
            if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
                plan.refused[name] = "lazy module not initialised yet"
            elif not isinstance(module, INITIALISABLE):
                plan.refused[name] = (
                    f"{type(module).__name__} is not a Linear/Conv layer; he_init leaves it alone "
                    "(recurrent layers: lstm_gru; norm layers keep their init)"
                )
            else:
                kind, act, slope = self._kind_for(ctx, name)
                fn, kwargs, gain = _scheme(kind, slope)
                weight = module.weight
                fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
                std = gain / math.sqrt(fan_in) if fn == "kaiming_normal_" else gain * math.sqrt(2.0 / (fan_in + fan_out))
                plan.targets.append(name)
                layers[name] = {
                    "init": fn.rstrip("_"),
                    "kwargs": kwargs,
                    "feeds": act,
                    "activation": kind or "none",
                    "target_std": std,
                }
                where = paths.expr(ctx.path(name), ctx.model)
                plan.code.append(f"nn.init.{fn}({where}.weight{_kwargs_code(kwargs)})")
                if getattr(module, "bias", None) is not None:
                    plan.code.append(f"nn.init.zeros_({where}.bias)")
        plan.details = {"layers": layers}
        if not plan.targets:
            plan.reason = "no Linear/Conv layer to re-initialise: " + plan.refusals()
            return plan
        plan.imports = ["from torch import nn"]
        schemes = sorted({f"{v['init']} for {v['activation']}" for v in layers.values()})
        plan.reason = (
            f"re-initialise at the scale that keeps the signal's variance through each layer's activation "
            f"({', '.join(schemes)}); biases zeroed"
        )
        return plan

    @torch.no_grad()
    def execute(self, ctx: FixContext, plan: Plan, change: Change) -> None:
        params: list[torch.Tensor] = []
        for name in plan.targets:
            module = self.module_now(ctx, name)
            info = plan.details["layers"][name]
            # measured here, not in plan(): a plan is also rendered as code for every diagnosis with
            # findings, on the training thread, where a std of every target weight cost ~15 ms
            info["std_before"] = float(module.weight.float().std()) if module.weight.numel() > 1 else 0.0
            fresh = torch.empty_like(module.weight)
            getattr(nn.init, info["init"] + "_")(fresh, **info["kwargs"])
            module.weight.copy_(fresh)
            params.append(module.weight)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
                params.append(module.bias)
            info["std_after"] = float(module.weight.float().std()) if module.weight.numel() > 1 else 0.0
        change.optimizer = optim_mod.reset_state_note(ctx.optimizer, params, "re-initialised")
