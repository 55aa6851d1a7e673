"""``insert_batchnorm``: a BatchNorm after each affected Linear/Conv layer, in the layout seen in the forward pass.

Why: normalising each layer's pre-activations keeps them in the range where the activation
has a usable derivative and makes the layer's output scale independent of its weight scale,
so gradients neither vanish through saturated units nor grow with over-scaled weights
(Ioffe & Szegedy 2015).

Layout, from ``structure["output_shapes"]`` (never guessed; without an observed forward pass
the fix refuses and asks for ``example_input=``):
    * Linear -> ``(B, C)``: ``nn.BatchNorm1d(C)``.
    * Linear -> ``(B, T, C)`` or more dimensions: :class:`~gradwatch.fixes.modules.ChannelLastBatchNorm`,
      a transpose-free BatchNorm over the last dimension (``nn.BatchNorm1d`` would normalise
      over ``T``). A BatchNorm, not a LayerNorm, so the fix means the same as for ``(B, C)``:
      batch statistics while training, running ones at eval.
    * Conv1d/2d/3d (and transposed) -> ``(B, C, ...)``: ``nn.BatchNorm1d/2d/3d(C)``.
The layer at ``net.2`` becomes ``nn.Sequential(original, norm)`` at the same name: the original
moves to ``net.2.0``, the norm is ``net.2.1``.

Initialisation: with ``example_input`` the norm's ``weight``/``bias`` and running statistics are
set from that batch's statistics of the layer's output (``weight = sqrt(var + eps)``,
``bias = mean``), so right after insertion the model computes what it did on that batch, in
train and in eval mode. Without a batch the norm keeps PyTorch's default
(``weight = 1, bias = 0``, running mean 0 / var 1): the layer's output is standardised from the
first training step on, which changes the function. The layer's own bias becomes redundant
(the norm subtracts the mean) and is left in place so no parameter disappears.

Refused: the layer producing the model's output (normalising it would fix the output's scale),
layers already followed by a norm, unbatched or exotic layouts, non Linear/Conv layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradwatch.findings import Finding
from gradwatch.fixes import ops, paths
from gradwatch.fixes.base import Fix, FixContext, Plan, call_model, target_layers
from gradwatch.fixes.record import Change
from gradwatch.fixes.registry import register_fix
from gradwatch.fixes.topology import is_norm

INITS: tuple[str, ...] = ("auto", "preserve", "default")


def norm_for(module: nn.Module, out_shape: Sequence[int]) -> tuple[str | None, int, str]:
    """(norm class name or ``None``, number of features, explanation) for a layer and its output shape."""
    shape = list(out_shape)
    if isinstance(module, nn.Linear):
        features = module.out_features
        if len(shape) == 2 and shape[-1] == features:
            return "BatchNorm1d", features, f"Linear output (B, {features}): BatchNorm1d"
        if len(shape) >= 3 and shape[-1] == features:
            return (
                "ChannelLastBatchNorm",
                features,
                f"Linear output {tuple(shape)} has features last: ChannelLastBatchNorm normalises each of the "
                f"{features} features over all other positions (BatchNorm1d would normalise over dim 1)",
            )
        return None, features, f"Linear output shape {tuple(shape)} is unbatched or not features-last"
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        features = module.out_channels
        if len(shape) == dims + 2 and shape[1] == features:
            return f"BatchNorm{dims}d", features, f"Conv{dims}d output {tuple(shape)}: BatchNorm{dims}d"
        return None, features, f"Conv{dims}d output shape {tuple(shape)} is unbatched"
    return None, 0, f"{type(module).__name__} is not a Linear/Conv layer"


@register_fix
class InsertBatchNorm(Fix):
    """BatchNorm1d/2d/3d (or :class:`ChannelLastBatchNorm`) after affected Linear/Conv layers.

    Args:
        init: ``"auto"`` (default: ``"default"``, i.e. weight=1, bias=0 — a standardising norm is
            what lifts a vanishing gradient), ``"preserve"`` (requires an ``example_input``: the
            output right after insertion equals the old one, and so does the gradient) or ``"default"``.
        eps: the norm's ``eps`` (default ``1e-5``).
        momentum: the norm's ``momentum`` (default ``0.1``).

    Raises:
        ValueError: ``init`` not among the choices above.
    """

    name = "insert_batchnorm"
    effect = "structural"
    kinds = ("vanishing", "exploding", "saturation", "dead_units")
    preflight = True
    why = {
        "vanishing": "normalising pre-activations keeps them in the non-saturated, unit-variance range at every depth",
        "exploding": "normalisation stops the forward signal from growing layer after layer",
        "saturation": "normalising pre-activations moves them back into the sensitive range",
    }

    def __init__(self, init: str = "auto", eps: float = 1e-5, momentum: float | None = 0.1):
        if init not in INITS:
            raise ValueError(f"insert_batchnorm: init={init!r}; allowed: {INITS}")
        self.init = init
        self.eps = float(eps)
        self.momentum = momentum

    def options(self) -> dict[str, Any]:
        return {"init": self.init, "eps": self.eps, "momentum": self.momentum}

    def _init_mode(self, ctx: FixContext) -> str:
        if self.init == "auto":
            # an output-preserving norm also preserves the backward gain (gamma / sigma = 1), so it
            # cannot lift a vanishing gradient until training moves gamma: measured on the plain
            # sigmoid CNN reference, preserve stays at chance (1.40) where default init reaches 0.19
            return "default"
        return self.init

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        init = self._init_mode(ctx)
        if init == "preserve" and ctx.example_input is None:
            plan.reason = "init='preserve' needs example_input=... to measure the layer's output statistics"
            return plan
        topo = ctx.topology
        last = topo.last_param_layer()
        layouts: dict[str, str] = {}
        names = list(targets) if targets is not None else target_layers(finding)
        for name, module in self.untreated_modules(ctx, names, plan, "a norm was already inserted after it"):
            if not topo.observed:
                plan.refused[name] = (
                    "no observed forward pass (Diagnosis.structure is empty): the tensor layout is unknown; "
                    "pass example_input=... so it can be observed"
                )
                continue
            if name not in topo.output_shapes or not topo.ran(name):
                plan.refused[name] = "did not run in the observed forward pass"
                continue
            if name == last:
                plan.refused[name] = "it produces the model's output; normalising it would pin the output's scale"
                continue
            nxt = topo.next_module(name)
            if nxt is not None and nxt in ctx.modules and is_norm(ctx.modules[nxt]):
                plan.refused[name] = f"already followed by {type(ctx.modules[nxt]).__name__} ({nxt})"
                continue
            norm, features, why = norm_for(module, topo.output_shapes[name])
            if norm is None:
                plan.refused[name] = why
                continue
            plan.targets.append(name)
            layouts[name] = why
            plan.ops.append(
                {
                    "op": "wrap_norm",
                    "path": ctx.path(name),
                    "norm": norm,
                    "num_features": features,
                    "eps": self.eps,
                    "momentum": self.momentum,
                }
            )
        plan.details = {"layouts": layouts, "init": init}
        if not plan.targets:
            plan.reason = "no layer to normalise: " + plan.refusals()
            return plan
        plan.code = [line for op in plan.ops for line in ops.code(op, ctx.model)]
        plan.imports = list(dict.fromkeys(line for op in plan.ops for line in ops.imports(op)))
        if init == "preserve":
            plan.code.append("# gradwatch set each norm's weight/bias from batch statistics so its output starts unchanged")
        plan.reason = (
            "normalise each affected layer's output: keeps pre-activations where the activation's derivative is usable "
            f"and the output scale independent of the weight scale ({init} init)"
        )
        return plan

    @torch.no_grad()
    def prepare(self, ctx: FixContext, plan: Plan) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """Per-feature mean and (biased) variance of each target's output on ``example_input``."""
        if plan.details["init"] != "preserve":
            return None
        model = ctx.model
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []

        def make_hook(name: str, channels_last: bool) -> Any:
            def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                if name in stats:
                    return
                x = output.detach().float()
                x = x.reshape(-1, x.shape[-1]) if channels_last else x.transpose(0, 1).reshape(x.shape[1], -1).t()
                stats[name] = (x.mean(dim=0), x.var(dim=0, unbiased=False))

            return hook

        for op, name in zip(plan.ops, plan.targets, strict=True):
            module = paths.get_module(model, op["path"])
            channels_last = op["norm"] in ("ChannelLastBatchNorm", "BatchNorm1d") and isinstance(module, nn.Linear)
            handles.append(module.register_forward_hook(make_hook(name, channels_last)))
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            call_model(model, ctx.example_input)
        finally:
            for h in handles:
                h.remove()
            for m, training in modes.items():
                m.training = training
        return stats

    @torch.no_grad()
    def finish(self, ctx: FixContext, plan: Plan, created: list[dict[str, Any]], prepared: Any, change: Change) -> None:
        inits: dict[str, str] = {}
        for item, name in zip(created, plan.targets, strict=True):
            norm = item["new"][1]
            if prepared is None or name not in prepared:
                inits[name] = "default (weight=1, bias=0): output standardised, not preserved; no example_input given"
                continue
            mean, var = prepared[name]
            mean = mean.to(norm.weight)
            var = var.to(norm.weight)
            norm.weight.copy_(torch.sqrt(var + norm.eps))
            norm.bias.copy_(mean)
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            inits[name] = "preserve: weight=sqrt(var+eps), bias=mean from the example batch; running stats = batch stats"
        change.details["inits"] = inits
