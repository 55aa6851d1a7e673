"""The run's metadata in the event file, so that ``gradwatch report`` can rebuild the run offline.

Layer types and depths, activation kinds, the run's context (optimizer, AMP...), thresholds and
cadences, as JSON in a plugin TensorBoard does not display (``gradwatch/meta``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

from gradwatch import tags as T

if TYPE_CHECKING:
    from gradwatch.sinks import RunSource

#: version of the metadata's JSON layout
META_FORMAT = 1
#: the run's cadences recorded with its metadata
_CADENCES = ("every_n_steps", "activation_every_n_steps", "slow_stats_every_n", "histogram_every_n_steps")


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=True)
        return value
    except (TypeError, ValueError):
        return repr(value)


def run_meta(source: RunSource | None, prefix: str, layers: list[str], layer_keys: dict[str, str],
             activations: list[str], act_keys: list[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The metadata of a run with these layers and activations (depth order) and their tag keys, and
    the source's context it records (``None`` without a source): a later change is worth a rewrite."""
    history = getattr(source, "history", None)
    lmeta = getattr(history, "layer_meta", {}) or {}
    ameta = getattr(history, "activation_meta", {}) or {}
    meta: dict[str, Any] = {
        "format": META_FORMAT,
        "prefix": prefix,
        "layers": [
            {"name": n, "key": layer_keys[n], **({**asdict(lmeta[n]), "depth": i} if n in lmeta else {"depth": i})}
            for i, n in enumerate(layers)
        ],
        "activations": [
            {"name": n, "key": k, **({**asdict(ameta[n]), "depth": i} if n in ameta else {"depth": i})}
            for i, (n, k) in enumerate(zip(activations, act_keys, strict=True))
        ],
    }
    context = None
    if source is not None:
        meta["name"] = getattr(source, "name", None)
        context = dict(getattr(history, "context", {}) or {})
        meta["context"] = {k: _json_safe(v) for k, v in context.items()}
        th = getattr(source, "thresholds", None)
        if th is not None:
            meta["thresholds"] = asdict(th)
        for attr in _CADENCES:
            if hasattr(source, attr):
                meta[attr] = getattr(source, attr)
    return meta, context


def meta_value(prefix: str, meta: dict[str, Any]) -> Summary.Value:
    """``meta`` as a ``Summary.Value`` of the gradwatch metadata plugin."""
    payload = json.dumps(meta).encode("utf-8")
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=T.META_PLUGIN, content=json.dumps({"format": META_FORMAT}).encode()),
        summary_description="gradwatch run metadata (read by `gradwatch report`)",
    )
    tensor = TensorProto(dtype="DT_STRING", string_val=[payload], tensor_shape=TensorShapeProto())
    return Summary.Value(tag=prefix + T.META_TAG, tensor=tensor, metadata=metadata)
