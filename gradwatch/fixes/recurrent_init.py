"""``recurrent_init``: re-initialise an over-scaled recurrent matrix orthogonally, in place.

Why: a vanilla RNN multiplies its state, and the gradient through time, by ``W_hh`` at every
step; with a spectral radius above 1 both grow geometrically with the sequence length (Pascanu
et al. 2013). Clipping only caps the symptom, and under Adam-like optimizers, which divide each
gradient by its own running scale, not even that: the updates stay the same size and the weights
stay over-scaled. An orthogonal ``W_hh`` (Saxe et al. 2014) has every singular value 1: the
recurrence neither amplifies nor forgets at the start, and training takes it from there.

Targets: the ``nn.RNN`` layers of the finding (``evidence["fix_layers"]`` or ``layers``) whose
recurrent matrices have spectral radius above 1 (measured here, in the plan: the fix knows when
it applies); every ``weight_hh_l*`` of such a layer is re-initialised with
``nn.init.orthogonal_(gain)``, input weights and biases are kept. Gated cells (LSTM/GRU) are
refused: their gates, not ``W_hh`` alone, set the gain through time. In place: same ``Parameter``
objects, their optimizer state reset; the report holds the spectral radius before and after.
Draws from torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradwatch.findings import Finding
from gradwatch.fixes import optim as optim_mod
from gradwatch.fixes import paths
from gradwatch.fixes.base import Fix, FixContext, Plan, number_option, target_layers
from gradwatch.fixes.record import Change
from gradwatch.fixes.registry import register_fix

#: Above this spectral radius a recurrent matrix amplifies through time (1 is the edge).
OVER_SCALED_RADIUS = 1.0


def spectral_radius(weight: torch.Tensor) -> float:
    """Largest absolute eigenvalue of a square matrix (float64 on the CPU: exact enough, and cheap
    for recurrent sizes)."""
    return float(torch.linalg.eigvals(weight.detach().to("cpu", torch.float64)).abs().max())


def _recurrent_weights(module: nn.RNN) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_hh_l")]


@register_fix
class RecurrentInit(Fix):
    """Orthogonal re-initialisation of over-scaled ``nn.RNN`` recurrent matrices.

    Args:
        gain: gain of ``nn.init.orthogonal_`` (default ``1.0``: every singular value 1). In
            ``(0, 1]``: the fix removes amplification, it does not add it.

    Raises:
        ValueError: ``gain`` outside ``(0, 1]``.
    """

    name = "recurrent_init"
    effect = "weights"
    kinds = ("exploding", "nonfinite")
    preflight = True
    why = {
        "exploding": "an orthogonal recurrent matrix has spectral radius 1: the state and the gradient through "
                     "time stop growing geometrically (clipping would only cap the symptom, and not at all "
                     "under Adam-like optimizers)",
        "nonfinite": "the recurrent matrix amplifies through time; re-initialising it orthogonally removes the "
                     "growth that overflows",
    }

    def __init__(self, gain: float = 1.0):
        self.gain = number_option("recurrent_init: gain", gain, 0.0, 1.0, low_open=True, high_open=False)

    def options(self) -> dict[str, Any]:
        return {"gain": self.gain}

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        names = list(targets) if targets is not None else target_layers(finding)
        layers: dict[str, Any] = {}
        for name, module in self.untreated_modules(ctx, names, plan,
                                                   "already re-initialised by an earlier fix"):
            if type(module) is not nn.RNN:
                plan.refused[name] = f"{type(module).__name__} is not an nn.RNN (gated cells: their gates set the gain)"
            else:
                radii = {w: spectral_radius(getattr(module, w)) for w in _recurrent_weights(module)}
                if max(radii.values(), default=0.0) <= OVER_SCALED_RADIUS:
                    plan.refused[name] = (f"recurrent matrices are not over-scaled (spectral radius "
                                          f"{max(radii.values(), default=0.0):.3g} <= {OVER_SCALED_RADIUS:g})")
                    continue
                plan.targets.append(name)
                layers[name] = {"weights": list(radii), "spectral_radius_before": radii}
                where = paths.expr(ctx.path(name), ctx.model)
                plan.code += [f"nn.init.orthogonal_({where}.{w}, gain={self.gain!r})" for w in radii]
        plan.details = {"layers": layers}
        if not plan.targets:
            plan.reason = "no over-scaled nn.RNN to re-initialise: " + plan.refusals()
            return plan
        plan.imports = ["from torch import nn"]
        plan.reason = (f"re-initialise the recurrent matrices of {plan.targets} orthogonally (gain {self.gain:g}): "
                       "spectral radius "
                       + ", ".join(f"{max(v['spectral_radius_before'].values()):.2f}" for v in layers.values())
                       + f" -> {self.gain:g}")
        return plan

    @torch.no_grad()
    def execute(self, ctx: FixContext, plan: Plan, change: Change) -> None:
        params: list[torch.Tensor] = []
        for name in plan.targets:
            module = self.module_now(ctx, name)
            info = plan.details["layers"][name]
            after = {}
            for w in info["weights"]:
                weight = getattr(module, w)
                fresh = torch.empty_like(weight)
                nn.init.orthogonal_(fresh, gain=self.gain)
                weight.copy_(fresh)
                params.append(weight)
                after[w] = spectral_radius(weight)
            info["spectral_radius_after"] = after
        change.optimizer = optim_mod.reset_state_note(ctx.optimizer, params, "re-initialised")
