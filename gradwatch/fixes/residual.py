"""``residual``: wrap shape-preserving blocks as ``x + alpha * block(x)`` (ReZero / SkipInit).

Why: a skip connection gives the gradient a path that bypasses the block's Jacobian, so it
reaches early layers undiminished however deep the stack (He et al. 2016). ``alpha`` is a
learnable scalar starting at ``0.0`` (see :class:`~gradwatch.fixes.modules.Residual`).

Blocks, checked against the observed forward pass (``structure``), never guessed:
    * in an ``nn.Sequential`` (with the stock ``forward``): the run of consecutive children
      starting at the affected layer and ending just before the next parameter layer (the layer
      with its norm/activation/dropout), wrapped when the run's input shape equals its output
      shape. ``net.2`` becomes ``Residual(nn.Sequential(net.2, net.3))``, ``net.3`` becomes
      ``nn.Identity()``, so later children keep their names;
    * elsewhere (a layer that is an attribute of a custom module): the layer alone, when its
      own input and output shapes match.
Refused: a block whose shapes differ (e.g. ``Linear(16, 32)``), one that contains the layer
producing the model's output or the output activation, layers that did not run or ran
out of order, and any layer when no forward pass was observed.

Adds one parameter (``alpha``) per block, which joins the optimizer with the hyperparameters
of the block's group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from gradwatch.findings import Finding
from gradwatch.fixes import ops, paths
from gradwatch.fixes.base import Fix, FixContext, Plan, target_layers
from gradwatch.fixes.registry import register_fix
from gradwatch.fixes.topology import is_norm, owns_parameters


def _has_param_layer(module: nn.Module) -> bool:
    return any(owns_parameters(m) and not is_norm(m) for m in module.modules())


@register_fix
class ResidualWrap(Fix):
    """Wrap shape-preserving blocks around the affected layers in a learnable-scale skip connection.

    Args:
        alpha_init: initial ``alpha`` (default ``0.0``: the block starts bypassed).
    """

    name = "residual"
    effect = "structural"
    kinds = ("vanishing",)
    preflight = True
    why = {
        "vanishing": "identity skip connections give gradients a path that bypasses the decaying chain",
    }

    def __init__(self, alpha_init: float = 0.0):
        self.alpha_init = float(alpha_init)

    def options(self) -> dict[str, Any]:
        return {"alpha_init": self.alpha_init}

    def _span(self, ctx: FixContext, name: str) -> tuple[list[str] | None, str]:
        """The block (original names) to wrap around layer ``name``, or ``None`` and why not."""
        topo = ctx.topology
        if name == "(root)":
            return None, "the model itself cannot be wrapped"
        parent_name, key = paths.parent_path(name)
        parent = ctx.modules.get(parent_name or "(root)")
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            keys = list(parent._modules)
            start = keys.index(key)
            span_keys = [key]
            for k in keys[start + 1 :]:
                child = parent._modules[k]
                if child is None or _has_param_layer(child):
                    break
                span_keys.append(k)
            span = [f"{parent_name}.{k}" if parent_name else k for k in span_keys]
        else:
            span = [name]
        missing = [n for n in span if not topo.ran(n)]
        if missing:
            return None, f"{missing} did not run in the observed forward pass"
        shared = [n for n in span if (topo.calls(n) or 1) > 1]
        if shared:
            return None, f"{shared} run more than once in forward(): wrapping them would change every use"
        # The block's modules must run one after the other, each once, with nothing else in between.
        positions = []
        for member in span:
            inside = [i for i, n in enumerate(topo.order) if n == member or n.startswith(member + ".")]
            if not inside:  # a parameter-free container whose children did not run on their own
                return None, f"{member} did not run in the observed forward pass"
            positions.append((min(inside), max(inside)))
        if any(a[1] >= b[0] for a, b in zip(positions, positions[1:], strict=False)):
            return None, f"the modules of block {span} did not run in order"
        between = [
            n
            for n in topo.order[positions[0][0] : positions[-1][1] + 1]
            if not any(n == s or n.startswith(s + ".") for s in span)
        ]
        if between:
            return None, f"other modules ({between[:3]}) run inside the block {span}"
        return span, ""

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        topo = ctx.topology
        last = topo.last_param_layer()
        outputs = topo.output_activations()
        covered: set[str] = set()
        blocks: dict[str, list[str]] = {}
        for name in list(targets) if targets is not None else target_layers(finding):
            if name not in ctx.modules:
                plan.refused[name] = "no module of that name in the model"
                continue
            if name in covered:
                continue
            if (self.name, name) in ctx.done:
                plan.refused[name] = "already inside a residual block"
                continue
            if not topo.observed:
                plan.refused[name] = (
                    "no observed forward pass (Diagnosis.structure is empty): shapes unknown; pass example_input=..."
                )
                continue
            span, why = self._span(ctx, name)
            if span is None:
                plan.refused[name] = why
                continue
            if last in span or outputs.intersection(span):
                plan.refused[name] = "the block produces the model's output (or holds the output activation)"
                continue
            shape_in = topo.input_shapes.get(span[0])
            shape_out = topo.output_shapes.get(span[-1])
            if not shape_in or shape_in != shape_out:
                plan.refused[name] = (
                    f"block {span} is not shape-preserving: input {shape_in} -> output {shape_out}"
                )
                continue
            covered.update(span)
            blocks[name] = span
            plan.targets.append(name)
            plan.ops.append(
                {
                    "op": "wrap_residual",
                    "path": ctx.path(span[0]),
                    "span": [ctx.path(n) for n in span],
                    "alpha_init": self.alpha_init,
                }
            )
        plan.details = {"blocks": blocks, "alpha_init": self.alpha_init}
        if not plan.targets:
            plan.reason = "no shape-preserving block to wrap: " + plan.refusals()
            return plan
        plan.code = [line for op in plan.ops for line in ops.code(op, ctx.model)]
        plan.imports = list(dict.fromkeys(line for op in plan.ops for line in ops.imports(op)))
        plan.reason = (
            f"skip connections give the gradient a path around each block; alpha starts at {self.alpha_init:g} "
            "so each block starts bypassed and is learnt back in (ReZero)"
        )
        return plan

    def commit(self, ctx: FixContext, plan: Plan) -> None:
        super().commit(ctx, plan)
        for span in plan.details["blocks"].values():
            for name in span:
                ctx.done.add((self.name, name))
