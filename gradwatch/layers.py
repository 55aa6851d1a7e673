"""Finding the layers of a model and the order in which they run.

A *layer* is a module that owns parameters directly (a Linear, a Conv, a norm layer, an RNN).
Its *depth* is the position at which it first runs in the forward pass, recorded once with
forward pre-hooks; registration order is only the fallback for layers that did not run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gradwatch.structure import ModelStructure

log = logging.getLogger(__name__)

ROOT_NAME = "(root)"

#: Activation modules whose negative side has (nearly) no gradient: units can die.
RELU_FAMILY: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Hardswish,
)
#: ReLU variants with a non-zero negative slope: they cannot die, so they are the dead-unit cure.
LEAKY_FAMILY: tuple[type[nn.Module], ...] = (nn.LeakyReLU, nn.PReLU, nn.RReLU)
#: Bounded activations that saturate: their derivative vanishes at the bounds.
SATURATING: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign)
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = RELU_FAMILY + LEAKY_FAMILY + SATURATING


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's module behind ``torch.compile`` and DDP wrappers, so names carry no prefix."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
            continue
        break
    return model


#: Attributes through which wrappers hold the wrapped module (``torch.compile``, FSDP, activation
#: checkpointing): they add a path segment but no layer, so names leave them out.
WRAPPER_SEGMENTS: tuple[str, ...] = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def clean_name(name: str) -> str:
    """A qualified module name without wrapper segments: ``"net._orig_mod.0"`` -> ``"net.0"``."""
    if not any(seg in name for seg in WRAPPER_SEGMENTS):
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` with wrapper segments left out of the names (see ``clean_name``).

    A wrapper and the module it wraps then share a name; both are listed, the wrapper first.
    """
    return [(clean_name(name), module) for name, module in model.named_modules()]


def activation_kind(module: nn.Module) -> str | None:
    """``"sigmoid" | "tanh" | "hard" | "relu" | "leaky"`` for activation modules, else ``None``."""
    if isinstance(module, nn.Sigmoid | nn.Hardsigmoid):
        return "sigmoid"
    if isinstance(module, nn.Tanh | nn.Softsign):
        return "tanh"
    if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
        return "hard"
    if isinstance(module, LEAKY_FAMILY):
        return "leaky"
    if isinstance(module, RELU_FAMILY):
        return "relu"
    return None


@dataclass
class LayerInfo:
    """A module that owns parameters directly.

    Attributes:
        name: qualified name as ``model.named_modules()`` spells it (``"(root)"`` for the model itself).
        type_name: the module's class name, e.g. ``"Linear"``.
        params: the parameters attributed to this layer (tied parameters go to their first owner).
        param_names: their attribute names on the module (``"weight"``, ``"bias"``...).
        numel: number of elements over ``params``.
        fan_in: fan-in of the main weight (``None`` if the layer has no matrix-like weight).
    """

    name: str
    module: nn.Module = field(repr=False)
    type_name: str
    params: list[nn.Parameter] = field(repr=False)
    param_names: list[str]
    numel: int
    fan_in: int | None = None


def _fan_in(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        receptive = 1
        for size in weight.shape[2:]:
            receptive *= int(size)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return int(weight.shape[0]) * receptive // max(1, module.groups)
        return int(weight.shape[1]) * receptive
    if isinstance(module, nn.RNNBase):
        return int(module.hidden_size)
    return None


def discover_layers(model: nn.Module) -> list[LayerInfo]:
    """All modules owning trainable-or-frozen parameters directly, in registration order."""
    seen: set[int] = set()
    layers: list[LayerInfo] = []
    for name, module in named_modules(model):
        params, names = [], []
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            params.append(p)
            names.append(pname)
        if not params:
            continue
        layers.append(
            LayerInfo(
                name=name or ROOT_NAME,
                module=module,
                type_name=type(module).__name__,
                params=params,
                param_names=names,
                numel=sum(p.numel() for p in params),
                fan_in=_fan_in(module),
            )
        )
    return layers


def discover_activations(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Activation modules (by class) with their qualified names, in registration order."""
    return [(name or ROOT_NAME, m) for name, m in named_modules(model) if isinstance(m, ACTIVATION_TYPES)]


class ForwardOrderRecorder:
    """Records the order in which modules first run in one forward pass, then removes its hooks.

    Attach before a forward pass; the hooks remove themselves when the model's forward returns,
    so at most one forward pays for them. ``order`` lists qualified names in execution order,
    ``output_shapes`` the shape of each module's (first tensor) output, ``calls`` how many times
    each module ran in that pass (a module shared by several positions runs more than once).
    A wrapper (``torch.compile``, FSDP, activation checkpointing) and the module it wraps share a
    name; a call through the wrapper counts once.
    """

    def __init__(self, model: nn.Module, on_done: Callable[[ForwardOrderRecorder], None] | None = None):
        self.order: list[str] = []
        self.output_shapes: dict[str, tuple[int, ...]] = {}
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.calls: dict[str, int] = {}
        self.done = False
        self._on_done = on_done
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        outermost: dict[str, nn.Module] = {}
        for name, module in named_modules(model):
            if module is model:
                continue
            counts = outermost.setdefault(name, module) is module  # the wrapper is listed before what it wraps
            self._handles.append(module.register_forward_hook(self._make_hook(name, counts)))
        self._handles.append(model.register_forward_hook(self._root_done))

    def _make_hook(self, name: str, counts: bool = True) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if counts:
                self.calls[name] = self.calls.get(name, 0) + 1
            if name not in self.output_shapes:
                self.order.append(name)
                self.output_shapes[name] = _shape_of(output)
                self.input_shapes[name] = _shape_of(args)

        return hook

    def _root_done(self, module: nn.Module | None, args: tuple, output: object) -> None:
        self.calls[ROOT_NAME] = self.calls.get(ROOT_NAME, 0) + 1
        self.order.append(ROOT_NAME)
        self.output_shapes[ROOT_NAME] = _shape_of(output)
        self.input_shapes[ROOT_NAME] = _shape_of(args)
        self.remove()
        self.done = True
        if self._on_done is not None:
            self._on_done(self)

    def finish_forward(self) -> None:
        """End the recorded forward pass by hand: for frameworks that run submodules without calling the
        model's own ``forward`` (whose return otherwise ends it)."""
        self._root_done(None, (), None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _shape_of(obj: object) -> tuple[int, ...]:
    if isinstance(obj, torch.Tensor):
        return tuple(obj.shape)
    if isinstance(obj, list | tuple):
        for item in obj:
            if isinstance(item, torch.Tensor):
                return tuple(item.shape)
    return ()


def depth_order(layers: list[LayerInfo], forward_order: list[str] | None) -> list[LayerInfo]:
    """Layers sorted by first forward execution; layers that never ran keep registration order after.

    Forward hooks fire when a module *finishes*; a container that owns parameters itself (a module
    with both its own ``weight`` and children) is placed where it finished, which is the best
    available estimate without pre-hooks on every module.
    """
    if not forward_order:
        return list(layers)
    rank: dict[str, float] = {name: float(i) for i, name in enumerate(forward_order)}
    for layer in layers:
        if layer.name in rank:
            continue
        # a submodule whose weights its parent uses directly (nn.MultiheadAttention's out_proj) never
        # "runs" itself: place it right after the nearest ancestor that did
        parts = layer.name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            ancestor = ".".join(parts[:cut])
            if ancestor in rank:
                rank[layer.name] = rank[ancestor] + 0.5
                break
    ran = [layer for layer in layers if layer.name in rank]
    not_ran = [layer for layer in layers if layer.name not in rank]
    ran.sort(key=lambda layer: rank[layer.name])
    return ran + not_ran


def structure_from_recorder(model: nn.Module, recorder: ForwardOrderRecorder) -> ModelStructure:
    """What one observed forward pass showed (``Diagnosis.structure`` holds its ``to_dict()``)."""
    modules = dict(named_modules(model))  # for a wrapper and its wrapped module the inner one wins
    types = {(n or ROOT_NAME): type(m).__name__ for n, m in modules.items()}
    layer_names = {layer.name for layer in discover_layers(model)}
    activations: dict[str, str | None] = {}
    last_layer: str | None = None
    for name in recorder.order:
        module = modules.get("" if name == ROOT_NAME else name)
        if name in layer_names and name != ROOT_NAME:
            last_layer = name
        elif module is not None and isinstance(module, ACTIVATION_TYPES):
            activations[name] = last_layer
    return ModelStructure(
        order=list(recorder.order),
        input_shapes={k: list(v) for k, v in recorder.input_shapes.items()},
        output_shapes={k: list(v) for k, v in recorder.output_shapes.items()},
        types=types,
        activations=activations,
        calls=dict(recorder.calls),
    )


@torch.no_grad()
def observe_structure(model: nn.Module, *example_args: object, **example_kwargs: object) -> dict:
    """Run one forward pass in eval mode (no grad; BatchNorm statistics untouched; each module's
    train/eval flag restored) and describe what ran, in order.

    Returns the same plain-data dict the watcher records on its first step
    (``Diagnosis.structure``): execution order, input/output shapes, class names, for each
    activation module the parameter layer that ran just before it, and ``"calls"``: how many
    times each module ran in the pass (fixes refuse to swap or wrap a module that runs more
    than once: it is shared by several positions).
    """
    recorder = ForwardOrderRecorder(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        model(*example_args, **example_kwargs)
    finally:
        recorder.remove()
        for module, training in modes.items():
            module.training = training
    return structure_from_recorder(model, recorder).to_dict()
