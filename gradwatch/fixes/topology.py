"""What the fixes need to know about a model's forward pass, read from ``Diagnosis.structure``.

The diagnosis records one observed forward pass (:func:`gradwatch.layers.observe_structure`):
execution order and input/output shapes. Fixes ask it questions such as "which activation
does this Linear feed?", "does this run of modules preserve its input's shape?", "which module
defines the model's output?". Shapes are never guessed: when the structure is missing, a fix
that needs shapes refuses (and says that ``example_input=...`` would let it observe one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from gradwatch.layers import ACTIVATION_TYPES, ROOT_NAME, activation_kind
from gradwatch.structure import ModelStructure

#: Normalisation layers: they own parameters, but a fix looking for "the next layer" walks past them.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


class Topology:
    """A read-only view of one forward pass over the *original* module names.

    Args:
        modules: ``{name: module}`` as ``model.named_modules()`` gave them before any fix
            (the root under ``"(root)"``).
        structure: ``Diagnosis.structure`` (the plain-dict form or a ``ModelStructure``; may be empty).
    """

    def __init__(self, modules: dict[str, nn.Module], structure: ModelStructure | Mapping[str, Any] | None):
        self.modules = modules
        self.structure = ModelStructure.from_dict(structure)
        order = [n for n in self.structure.order if n != ROOT_NAME]
        #: True when the order and shapes come from an observed forward pass.
        self.observed = bool(order)
        if not order:
            order = [n for n in modules if n != ROOT_NAME]
        # Containers finish after their children: keep only modules without children that ran,
        # plus modules that own parameters themselves.
        containers = {name.rsplit(".", i)[0] for name in order for i in range(1, name.count(".") + 1)}
        self.order = [n for n in order if n not in containers or self._owns(n)]
        self._rank = {n: i for i, n in enumerate(self.order)}
        self._ran = set(order) if self.observed else set()
        self.input_shapes: dict[str, list[int]] = dict(self.structure.input_shapes)
        self.output_shapes: dict[str, list[int]] = dict(self.structure.output_shapes)

    def _owns(self, name: str) -> bool:
        module = self.modules.get(name)
        return module is not None and owns_parameters(module)

    def ran(self, name: str) -> bool:
        """True when ``name`` (a leaf or a container) ran in the observed forward pass."""
        return name in self._ran

    def calls(self, name: str) -> int | None:
        """How many times ``name`` ran in the observed pass, when the structure records it (``calls``)."""
        value = self.structure.calls.get(name)
        return int(value) if value is not None else None

    def is_param_layer(self, name: str) -> bool:
        """A module owning parameters that is not a normalisation layer."""
        module = self.modules.get(name)
        return module is not None and owns_parameters(module) and not is_norm(module)

    def is_activation(self, name: str) -> bool:
        return isinstance(self.modules.get(name), ACTIVATION_TYPES)

    def after(self, name: str) -> list[str]:
        """Modules that ran after ``name``, in order (empty if it did not run)."""
        if name not in self._rank:
            return []
        return self.order[self._rank[name] + 1:]

    def following_activation(self, layer: str) -> str | None:
        """The activation module ``layer`` feeds: the first activation after it, walking past
        normalisation, dropout, pooling and other parameter-free modules, but not past another
        parameter layer (then the layer feeds none)."""
        for name in self.after(layer):
            if self.is_activation(name):
                return name
            if self.is_param_layer(name):
                return None
        return None

    def feeding_layer(self, activation: str) -> str | None:
        """The parameter layer that ran last before ``activation`` (walking past norms)."""
        if activation not in self._rank:
            return None
        for name in reversed(self.order[: self._rank[activation]]):
            if self.is_param_layer(name):
                return name
        return None

    def last_param_layer(self) -> str | None:
        for name in reversed(self.order):
            if self.is_param_layer(name):
                return name
        return None

    def output_activations(self) -> set[str]:
        """Activation modules that run after the last parameter layer: they define the output range."""
        last = self.last_param_layer()
        tail = self.after(last) if last is not None else list(self.order)
        return {n for n in tail if self.is_activation(n)}

    def next_module(self, name: str) -> str | None:
        rest = self.after(name)
        return rest[0] if rest else None


def kind_of(module: nn.Module | None) -> str | None:
    """``activation_kind`` that tolerates ``None``."""
    return activation_kind(module) if module is not None else None
