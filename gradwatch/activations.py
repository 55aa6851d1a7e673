"""Activation statistics on sampled steps: dead units, saturation, forward and backward signal size.

Forward hooks exist only while a sampled step's forward pass runs: :meth:`ActivationSampler.arm`
registers them, and they remove themselves when the model's own forward returns, so unsampled
steps pay nothing. Statistics stay on the device until the watcher's single host copy.

Per activation module (input ``x``, output ``y``):
- ``dead_frac``: fraction of units (channels for conv layouts, features otherwise) whose
  pre-activation is ``<= 0`` for every sample and position in the batch (ReLU family only: these
  units get no gradient).
- ``saturated_frac``: fraction of outputs in the flat region (sigmoid within 0.01 of 0 or 1,
  tanh/softsign within 0.01 of +-1, hardtanh/hardsigmoid at their clip values).
- ``unit_samples``: how many values each unit's deadness was judged on (batch x positions): with
  few samples a unit can be inactive by chance (probability ~ 0.5 ** samples), so the diagnosis
  ignores dead fractions measured on too few.

Per parameter layer (its first tensor output ``o``):
- ``act_rms``: RMS of ``o`` (forward signal size across depth),
- ``out_grad_rms``: RMS of ``dL/do`` (backward signal size across depth), via a hook on that one
  output tensor, which lives only as long as the step's autograd graph.
- ``time_decay_decades`` (recurrent layers only): how many orders of magnitude the gradient with
  respect to the layer's *input* at the first time steps is below the one at the last time steps.
  A recurrent weight's gradient is a sum over time steps, so it cannot show vanishing *through
  time*; ``dL/dx_t`` carries every path from the loss back to step ``t`` and can. When the input
  does not require grad (raw data), the sampled step feeds the RNN ``x.detach().requires_grad_()``
  instead: same values, same forward, same parameter gradients, one extra input gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from gradwatch.layers import LayerInfo, activation_kind
from gradwatch.metrics import ACT_METRICS, LAYER_SIGNAL_METRICS

_CHANNEL_FIRST = ("Conv", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm", "MaxPool", "AvgPool")


def _first_tensor(obj: object) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, list | tuple):
        for item in obj:
            if isinstance(item, torch.Tensor):
                return item
    return None


def _rms(t: torch.Tensor) -> torch.Tensor:
    """RMS of |t| in float32, in one pass without temporaries (``vector_norm`` / sqrt(numel))."""
    t = t.detach()
    wide = t.dtype in (torch.float32, torch.float64) or t.is_complex()
    return torch.linalg.vector_norm(t, dtype=None if wide else torch.float32).float() / math.sqrt(t.numel())


def _fraction(mask: torch.Tensor) -> torch.Tensor:
    return torch.count_nonzero(mask).float() / mask.numel()


def _saturated(kind: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    # boolean masks counted with count_nonzero (no float copy of the mask)
    if kind == "sigmoid":
        if isinstance(module, nn.Hardsigmoid):
            return _fraction((x <= -3) | (x >= 3))
        return _fraction((y < 0.01) | (y > 0.99))
    if kind == "tanh":
        return _fraction(y.abs() > 0.99)
    if kind == "hard":
        lo, hi = float(getattr(module, "min_val", -1.0)), float(getattr(module, "max_val", 1.0))
        return _fraction((x <= lo) | (x >= hi))
    return None


class ActivationSampler:
    """Registers one-shot hooks for one sampled forward/backward and gathers their statistics.

    Args:
        model: the watched module.
        activations: ``(name, module)`` of activation modules to measure.
        layers: parameter layers whose output signal size to measure.
        channel_first: names of activations whose units are along dim 1 (conv layouts);
            the others use the last dimension.
    """

    def __init__(
        self,
        model: nn.Module,
        activations: Sequence[tuple[str, nn.Module]],
        layers: Sequence[LayerInfo],
        channel_first: set[str] | None = None,
    ):
        self.model = model
        self.activations = list(activations)
        self.layers = list(layers)
        self.channel_first = set(channel_first or ())
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # captured values keyed by module name, so the layer order can change while armed
        self._act: dict[str, torch.Tensor] = {}
        self._fwd: dict[str, torch.Tensor] = {}
        self._bwd: dict[str, torch.Tensor] = {}
        self._time: dict[str, torch.Tensor] = {}
        self.armed = False
        self.captured = False

    def update(
        self, activations: Sequence[tuple[str, nn.Module]], layers: Sequence[LayerInfo], channel_first: set[str]
    ) -> None:
        """Adopt a new order/set of modules (e.g. once forward order is known); re-arms if armed."""
        was_armed = self.armed
        self.disarm()
        self.activations, self.layers, self.channel_first = list(activations), list(layers), set(channel_first)
        if was_armed:
            self.arm(keep=True)

    @property
    def n_values(self) -> int:
        return len(self.activations) * len(ACT_METRICS) + len(self.layers) * len(LAYER_SIGNAL_METRICS)

    def arm(self, keep: bool = False) -> None:
        """Attach hooks for the next forward pass only (``keep``: keep values already captured)."""
        if self.armed:
            return
        if not keep:
            self._act.clear()
            self._fwd.clear()
            self._bwd.clear()
            self._time.clear()
            self.captured = False
        for name, module in self.activations:
            kind = activation_kind(module)
            if kind is None:
                continue
            self._handles.append(module.register_forward_hook(self._act_hook(name, kind)))
        for layer in self.layers:
            if layer.module is self.model:
                continue
            self._handles.append(layer.module.register_forward_hook(self._layer_hook(layer.name)))
            if isinstance(layer.module, nn.RNNBase):
                self._handles.append(layer.module.register_forward_pre_hook(self._time_hook(layer.name, layer.module)))
        self._handles.append(self.model.register_forward_hook(self._root_done))
        self.armed = True

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.armed = False

    def finish_forward(self) -> None:
        """End the sampled forward pass by hand: for frameworks that run submodules without calling the
        model's own ``forward`` (whose return otherwise ends it)."""
        self._root_done(self.model, (), None)

    def _root_done(self, module: nn.Module, args: tuple, output: object) -> None:
        self.disarm()
        self.captured = True
        # until step() consumes this capture, a new forward means the batch failed before step():
        # a one-shot pre-hook then drops the stale capture and samples that forward instead
        self._remove_guard()
        self._guard = self.model.register_forward_pre_hook(self._next_forward_before_step)

    def _next_forward_before_step(self, module: nn.Module, args: tuple) -> None:
        self._remove_guard()
        if self.captured:
            self.captured = False
            self.arm()

    def _remove_guard(self) -> None:
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.remove()
            self._guard = None

    def close(self) -> None:
        """Remove every hook, the stale-capture guard included."""
        self.disarm()
        self._remove_guard()

    def _act_hook(self, name: str, kind: str) -> Callable:
        @torch.no_grad()
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            unit_dim_first = name in self.channel_first
            x, y = _first_tensor(args), _first_tensor(output)
            if x is None or y is None or x.numel() == 0 or not x.is_floating_point():
                return
            # scalars known on the host are made with fill kernels (torch.full), not torch.tensor():
            # a host-to-device copy would synchronise an accelerator inside the forward pass
            nan = torch.full((), math.nan, device=x.device)
            if kind == "relu" and x.dim() >= 1:
                unit_dim = 1 if (unit_dim_first and x.dim() >= 3) or x.dim() == 2 else x.dim() - 1
                if x.dim() == 1:
                    unit_dim = 0
                reduce = [d for d in range(x.dim()) if d != unit_dim]
                n_units = x.shape[unit_dim]
                alive = x.amax(dim=reduce) > 0 if reduce else x > 0
                dead = 1.0 - alive.float().mean()
                samples = torch.full((), float(x.numel() // max(1, n_units)), device=x.device)
            else:
                dead, samples = nan, nan
            sat = _saturated(kind, module, x.float(), y.float())  # no copy for float32
            measured = {"dead_frac": dead, "saturated_frac": sat if sat is not None else nan, "unit_samples": samples}
            self._act[name] = torch.stack([measured[m].float() for m in ACT_METRICS])

        return hook

    def _layer_hook(self, index: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            o = _first_tensor(output)
            if o is None or o.numel() == 0 or not (o.is_floating_point() or o.is_complex()):
                return
            with torch.no_grad():
                self._fwd[index] = _rms(o)
            if o.requires_grad:

                def grad_hook(g: torch.Tensor) -> None:
                    with torch.no_grad():
                        self._bwd[index] = _rms(g)

                o.register_hook(grad_hook)

        return hook

    def _time_hook(self, name: str, module: nn.RNNBase) -> Callable:
        def pre_hook(mod: nn.Module, args: tuple) -> tuple | None:
            if not args or not isinstance(args[0], torch.Tensor) or not torch.is_grad_enabled():
                return None
            x = args[0]
            if x.dim() < 2 or x.numel() == 0 or not x.is_floating_point():
                return None
            time_dim = 0 if x.dim() == 2 or not module.batch_first else 1
            replaced = None
            if not x.requires_grad:
                replaced = x.detach().requires_grad_(True)
                x = replaced

            def grad_hook(g: torch.Tensor) -> None:
                with torch.no_grad():
                    dims = [d for d in range(g.dim()) if d != time_dim]
                    per_t = g.detach().float().square().sum(dim=dims).sqrt()
                    t = per_t.numel()
                    k = max(1, t // 10)
                    early = per_t[:k].median().clamp_min(1e-38)
                    late = per_t[-k:].median()
                    value = torch.log10(late.clamp_min(1e-38) / early)
                    # no gradient at all reaching the last steps: nothing to compare
                    self._time[name] = torch.where(late > 0, value, torch.full_like(value, math.nan))

            x.register_hook(grad_hook)
            return (replaced, *args[1:]) if replaced is not None else None

        return pre_hook

    def gather(self, device: torch.device) -> torch.Tensor | None:
        """Flat float32 tensor of all sampled values on ``device`` (NaN where nothing was seen)."""
        self._remove_guard()
        if not self.captured:
            return None
        self.captured = False
        no_act = torch.full((len(ACT_METRICS),), math.nan, device=device)
        nan1 = torch.full((), math.nan, device=device)
        parts = [self._act.get(name, no_act).to(device) for name, _ in self.activations]
        by_metric = {"act_rms": self._fwd, "out_grad_rms": self._bwd, "time_decay_decades": self._time}
        signal = [[by_metric[m].get(layer.name, nan1).to(device) for layer in self.layers] for m in LAYER_SIGNAL_METRICS]
        self._act.clear()
        self._fwd.clear()
        self._bwd.clear()
        self._time.clear()
        flat = []
        if parts:
            flat.append(torch.stack(parts).reshape(-1))
        if self.layers:
            flat.append(torch.stack([torch.stack(col) for col in signal], dim=1).reshape(-1))
        return torch.cat(flat) if flat else torch.zeros(0, device=device)

    def split(self, host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Undo :meth:`gather`'s flattening: ``(act[n_act, len(ACT_METRICS)], layer[n_layers, len(LAYER_SIGNAL_METRICS)])``."""
        n_act = len(self.activations) * len(ACT_METRICS)
        act = host[:n_act].reshape(len(self.activations), len(ACT_METRICS))
        lay = host[n_act:].reshape(len(self.layers), len(LAYER_SIGNAL_METRICS))
        return act, lay
