"""What the history and the sinks know about each layer and activation besides its numbers.

Built once per layer set (at ``watch()``, after the first forward pass records the depth order, and
after a fix changed the model), never on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from gradwatch.history_view import ActivationMeta, LayerMeta
from gradwatch.layers import ROOT_NAME, LayerInfo, activation_kind, discover_activations
from gradwatch.structure import ModelStructure

#: Layer types whose output keeps channels in dimension 1: an activation they feed is measured per channel.
CHANNEL_FIRST_FEEDERS = ("Conv", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm")


def layer_meta(layers: list[LayerInfo]) -> list[LayerMeta]:
    """Type, depth, fan-in, size and recurrence of ``layers`` (already in depth order)."""
    return [
        LayerMeta(type_name=layer.type_name, depth=i, fan_in=layer.fan_in, numel=layer.numel,
                  recurrent=isinstance(layer.module, nn.RNNBase))
        for i, layer in enumerate(layers)
    ]


@dataclass
class ActivationLayout:
    """A model's activation modules in forward order, with their metadata.

    Attributes:
        modules: ``(qualified name, module)`` in forward order (registration order for those not seen).
        meta: one :class:`ActivationMeta` per module.
        channel_first: names of activations fed by a channel-first layer (convolutions, 2-D/3-D norms).
    """

    modules: list[tuple[str, nn.Module]]
    meta: list[ActivationMeta]
    channel_first: set[str] = field(default_factory=set)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.modules]


def activation_layout(model: nn.Module, layers: list[LayerInfo], order: list[str] | None,
                      structure: ModelStructure) -> ActivationLayout:
    """The activations of ``model`` ordered by ``order`` (the recorded forward order, if any), each with
    the layer feeding it (from ``structure``) and whether it is an output activation (no layer with
    parameters runs after it: it defines the output range)."""
    acts = discover_activations(model)
    rank = {n: i for i, n in enumerate(order or [])}
    acts.sort(key=lambda a: rank.get(a[0], len(rank)))
    feeders = structure.activations
    types = structure.types
    last_layer_pos = max((rank[layer.name] for layer in layers if layer.name in rank and layer.name != ROOT_NAME),
                         default=-1)
    meta, channel_first = [], set()
    for i, (name, module) in enumerate(acts):
        feeder = feeders.get(name)
        if feeder and types.get(feeder, "").startswith(CHANNEL_FIRST_FEEDERS):
            channel_first.add(name)
        meta.append(ActivationMeta(
            kind=activation_kind(module) or "", type_name=type(module).__name__, depth=i, feeding_layer=feeder,
            is_output=bool(rank) and rank.get(name, -1) > last_layer_pos,
        ))
    return ActivationLayout(acts, meta, channel_first)
