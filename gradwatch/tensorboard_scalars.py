"""A collected step's scalars as one serialized ``Summary``: per-layer, per-activation and run totals.

The tags (``<metric>/NN.<layer>``, see :mod:`gradwatch.tags`) are encoded once per layer set; a step
then costs a few NumPy passes over its values (:class:`gradwatch.tensorboard_events.ScalarEncoder`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from gradwatch import tags as T
from gradwatch.metrics import ACT_METRICS, GRAD_METRICS, LAYER_SIGNAL_METRICS
from gradwatch.tensorboard_events import ScalarEncoder, encode_scalars, value_prefix

if TYPE_CHECKING:
    from gradwatch.sinks import StepRecord


def _encoder(tags: list[str]) -> ScalarEncoder:
    return ScalarEncoder([value_prefix(t) for t in tags])


class ScalarTags:
    """The encoded tags of the current layers and activations, and the step encoding that uses them.

    Args:
        prefix: prepended to every tag.
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        #: ``{layer name: "NN.<layer>"}`` of the current layers
        self.layer_keys: dict[str, str] = {}
        #: ``"NN.<activation>"`` of the current activations, in order
        self.act_keys: list[str] = []
        self._key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._lists: tuple[list[str], list[str], tuple[int, int]] | None = None
        self._totals: dict[str, bytes] = {}
        self._grad = self._act = self._signal = ScalarEncoder([])

    @property
    def empty(self) -> bool:
        """No layers seen yet (no step encoded)."""
        return self._key is None

    def update(self, layers: list[str], activations: list[str]) -> bool:
        """Make the tables follow ``layers`` and ``activations``; whether they changed."""
        lists = self._lists
        if lists is not None and lists[0] is layers and lists[1] is activations \
                and lists[2] == (len(layers), len(activations)):
            return False  # the watcher passes the same lists until its layers change
        self._lists = (layers, activations, (len(layers), len(activations)))
        key = (tuple(layers), tuple(activations))
        if key == self._key:
            return False
        self._key = key
        lw, aw = T.depth_width(len(layers)), T.depth_width(len(activations))
        self.layer_keys = {name: T.layer_key(i, name, lw) for i, name in enumerate(layers)}
        self.act_keys = [T.layer_key(i, name, aw) for i, name in enumerate(activations)]
        p = self.prefix
        self._grad = _encoder([f"{p}{m}/{self.layer_keys[n]}" for n in layers for m in GRAD_METRICS])
        self._signal = _encoder([f"{p}{m}/{self.layer_keys[n]}" for n in layers for m in LAYER_SIGNAL_METRICS])
        self._act = _encoder([f"{p}{m}/{k}" for k in self.act_keys for m in ACT_METRICS])
        return True

    def layer_key(self, name: str, index: int, n: int) -> str:
        """The ``NN.<layer>`` key of a layer: the current one, else from its position among ``n``."""
        key = self.layer_keys.get(name)
        return key if key is not None else T.layer_key(index, name, T.depth_width(n))

    def encode(self, record: StepRecord) -> bytes:
        """The step's scalars as a serialized ``Summary`` (NaN: not measured, skipped).

        Raises:
            ValueError: the record's values do not match the current layers.
        """
        flat = np.asarray(record.values, dtype=np.float64).reshape(-1)
        if len(flat) != len(self._grad):
            raise ValueError(f"step record has {flat.size} values for {len(self._grad)} tags")
        parts = [self._grad.encode(flat)]
        for arr, tags in ((record.act_values, self._act), (record.signal, self._signal)):
            if arr is None:
                continue
            a = np.asarray(arr, dtype=np.float64)
            if a.ndim != 2 or a.size != len(tags):
                continue  # shapes from a newer core than this writer knows
            parts.append(tags.encode(a.reshape(-1)))
        totals = {"grad_norm": record.total_norm, "loss": record.loss, **record.extra}
        names = [k for k, v in totals.items() if v is not None and not math.isnan(v)]
        if names:
            prefixes = np.array([self._total_prefix(k) for k in names], dtype=object)
            parts.append(encode_scalars(prefixes, np.array([float(totals[k]) for k in names])))
        return b"".join(parts)

    def _total_prefix(self, name: str) -> bytes:
        prefix = self._totals.get(name)
        if prefix is None:
            prefix = self._totals[name] = value_prefix(T.total_tag(name, self.prefix))
        return prefix
