"""A histogram step's gradient (and weight) histograms as one serialized ``Summary``, binned on the
gradients' device (:mod:`gradwatch.histograms`); on an accelerator the counts reach the host without
the training thread waiting for them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gradwatch import tags as T
from gradwatch.histograms import PendingHistograms, launch_bins
from gradwatch.tensorboard_events import histogram_value_bytes, scalar_value

if TYPE_CHECKING:
    from gradwatch.layers import LayerInfo


class PendingHistogramSummary:
    """A histogram step's binning launched on the device; its ``Summary`` once the counts reached the host."""

    def __init__(self, keys: list[str], prefix: str, grads: PendingHistograms, weights: PendingHistograms | None):
        self.keys = keys
        self.prefix = prefix
        self.grads = grads
        self.weights = weights

    def ready(self) -> bool:
        """The counts are on the host (asked without waiting)."""
        return self.grads.ready() and (self.weights is None or self.weights.ready())

    def encode(self) -> bytes:
        """The serialized ``Summary`` (waits for the counts if they are still on their way)."""
        results = self.grads.result()
        weight_results = self.weights.result() if self.weights is not None else None
        prefix = self.prefix
        parts: list[bytes] = []
        for i, key in enumerate(self.keys):
            h = results[i]
            if h is not None:
                parts.append(histogram_value_bytes(f"{prefix}{T.GRAD_HIST}/{key}", h.values))
                parts.append(histogram_value_bytes(f"{prefix}{T.LOG10_HIST}/{key}", h.log10_abs))
                parts += [scalar_value(f"{prefix}{name}/{key}", value)
                          for name, value in zip(T.HIST_COUNTS, (h.zeros, h.nan, h.inf), strict=True)]
            if weight_results is not None and weight_results[i] is not None:
                parts.append(histogram_value_bytes(f"{prefix}{T.WEIGHT_HIST}/{key}", weight_results[i].values))
        return b"".join(parts)


def launch_histograms(layers: list[LayerInfo], layer_key: Callable[[str, int, int], str], prefix: str = "",
                      weights: bool = False) -> PendingHistogramSummary:
    """Bin ``grad_hist`` (values) and ``grad_log10abs`` (log10|g|) histograms and the ``hist_zeros``,
    ``hist_nan``, ``hist_inf`` counts of each layer, plus ``weight_hist`` with ``weights``, on the
    tensors' devices; the copies to the host do not wait for the device.

    Args:
        layers: the layers binned on this step (their gradients still live).
        layer_key: ``(name, index, count) -> "NN.<layer>"``, the layer's tag key.
        prefix: prepended to every tag.
        weights: also bin the weights.
    """
    grads = launch_bins([[p.grad for p in layer.params if p.grad is not None] for layer in layers])
    weight_bins = launch_bins([[p.detach() for p in layer.params] for layer in layers]) if weights else None
    keys = [layer_key(layer.name, i, len(layers)) for i, layer in enumerate(layers)]
    return PendingHistogramSummary(keys, prefix, grads, weight_bins)

