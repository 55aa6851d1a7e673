"""A histogram step's gradient (and weight) histograms as one serialized ``Summary``, binned on the
gradients' device (:mod:`gradwatch.histograms`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gradwatch import tags as T
from gradwatch.histograms import bin_on_device
from gradwatch.tensorboard_events import histogram_value_bytes, scalar_value

if TYPE_CHECKING:
    from gradwatch.layers import LayerInfo


def encode_histograms(layers: list[LayerInfo], layer_key: Callable[[str, int, int], str], prefix: str = "",
                      weights: bool = False) -> bytes:
    """``grad_hist`` (values) and ``grad_log10abs`` (log10|g|) histograms and the ``hist_zeros``,
    ``hist_nan``, ``hist_inf`` counts of each layer, plus ``weight_hist`` with ``weights``.

    Args:
        layers: the layers binned on this step (their gradients still live).
        layer_key: ``(name, index, count) -> "NN.<layer>"``, the layer's tag key.
        prefix: prepended to every tag.
        weights: also bin the weights.
    """
    results = bin_on_device([[p.grad for p in layer.params if p.grad is not None] for layer in layers])
    weight_results = bin_on_device([[p.detach() for p in layer.params] for layer in layers]) if weights else None
    parts: list[bytes] = []
    for i, layer in enumerate(layers):
        key = layer_key(layer.name, i, len(layers))
        h = results[i]
        if h is not None:
            parts.append(histogram_value_bytes(f"{prefix}{T.GRAD_HIST}/{key}", h.values))
            parts.append(histogram_value_bytes(f"{prefix}{T.LOG10_HIST}/{key}", h.log10_abs))
            parts += [scalar_value(f"{prefix}{name}/{key}", value)
                      for name, value in zip(T.HIST_COUNTS, (h.zeros, h.nan, h.inf), strict=True)]
        if weight_results is not None and weight_results[i] is not None:
            parts.append(histogram_value_bytes(f"{prefix}{T.WEIGHT_HIST}/{key}", weight_results[i].values))
    return b"".join(parts)
