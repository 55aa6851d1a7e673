"""Noticing that a model's parameters were replaced since its layers were discovered (a fix, surgery)."""

from __future__ import annotations

from torch import nn

from gradwatch.layers import LayerInfo, discover_layers


class ParameterChanges:
    """Compares a model's parameters with those of the layers last discovered.

    Args:
        model: the watched model.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._key: tuple[int, ...] = ()
        self._fingerprint: tuple[int, ...] | None = None

    def remember(self, layers: list[LayerInfo]) -> None:
        """The parameters of ``layers`` are the ones watched now."""
        self._key = tuple(id(p) for layer in layers for p in layer.params)

    def changed(self) -> bool:
        """Whether the layers' parameters differ from the remembered ones.

        Cheap on the hot path: the identities of ``model.parameters()`` (a fraction of the cost of
        re-discovering layers) are compared with the last check first; only when they differ are the
        layers re-discovered.
        """
        fingerprint = tuple(map(id, self.model.parameters()))
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        key = tuple(id(p) for layer in discover_layers(self.model) for p in layer.params)
        return key != self._key
