"""TensorBoard tag names: one scheme, shared by the writer (``tensorboard.py``) and the reader (``logs.py``).

Per-layer tags are ``<metric>/<depth>.<layer>``: the depth is zero-padded (``grad_norm/03.net.4``)
so that TensorBoard, which sorts tags as strings, lists the layers from input to output. Global
series are ``<metric>/total`` (``grad_norm/total``, ``loss/total``, ``clip_threshold/total``).
Module names never contain ``/`` and the depth prefix is all digits followed by the first ``.``,
so a tag maps back to its layer name without ambiguity (``03.0.weight``-style names included).

An optional ``prefix`` (e.g. ``"gradwatch/"``) namespaces every tag when the writer is shared
with other metrics; it is recorded in the run's metadata so the reader can strip it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOTAL = "total"
#: The pseudo-layer name of global series in gradwatch's long-format frames.
TOTAL_LAYER = "(total)"
#: Tag of gradwatch's run metadata (a tensor summary of a plugin TensorBoard does not display).
META_TAG = "gradwatch/meta"
META_PLUGIN = "gradwatch"
DIAGNOSIS_TAG = "gradwatch/diagnosis"
FIGURE_TAG = "gradwatch/gradient_flow"
LAYOUT_CATEGORY = "gradwatch"

GRAD_HIST = "grad_hist"
LOG10_HIST = "grad_log10abs"
WEIGHT_HIST = "weight_hist"
#: Scalars written on histogram steps: elements the log10|g| histogram cannot hold.
HIST_COUNTS: tuple[str, ...] = ("hist_zeros", "hist_nan", "hist_inf")

_TAG = re.compile(r"^(?P<metric>[^/]+)/(?:(?P<depth>\d+)\.(?P<layer>.+)|(?P<total>total))$")


def depth_width(n: int) -> int:
    """Digits used for depth prefixes of ``n`` layers (at least 2, so 10 layers still sort)."""
    return max(2, len(str(max(0, n - 1))))


def layer_key(depth: int, name: str, width: int) -> str:
    """The layer part of a tag: ``"03.net.4"``."""
    return f"{depth:0{width}d}.{name}"


def layer_tag(metric: str, depth: int, name: str, width: int, prefix: str = "") -> str:
    """``"<prefix><metric>/<depth>.<name>"``, e.g. ``grad_norm/03.net.4``."""
    return f"{prefix}{metric}/{layer_key(depth, name, width)}"


def total_tag(metric: str, prefix: str = "") -> str:
    """``"<prefix><metric>/total"``, e.g. ``grad_norm/total``."""
    return f"{prefix}{metric}/{TOTAL}"


@dataclass(frozen=True)
class ParsedTag:
    """What a gradwatch scalar tag means: ``layer`` is ``"(total)"`` for global series."""

    metric: str
    layer: str
    depth: int | None


def parse_tag(tag: str, prefix: str = "") -> ParsedTag | None:
    """Map a tag written by :mod:`gradwatch.tensorboard` back to ``(metric, layer, depth)``.

    Returns ``None`` for tags that do not follow the scheme (other people's metrics).
    """
    if prefix:
        if not tag.startswith(prefix):
            return None
        tag = tag[len(prefix):]
    m = _TAG.match(tag)
    if m is None:
        return None
    if m.group("total"):
        return ParsedTag(m.group("metric"), TOTAL_LAYER, None)
    return ParsedTag(m.group("metric"), m.group("layer"), int(m.group("depth")))


def layout(prefix: str = "", extra_totals: tuple[str, ...] = ("clip_threshold",),
           activations: bool = True) -> dict[str, dict[str, list]]:
    """The custom-scalars layout: the whole gradient-flow picture on one page ("gradwatch" category).

    Chart tags are regular expressions (TensorBoard matches them against every scalar tag), so one
    layout covers layers that appear later and any number of layers. ``activations=False`` (a model
    without activation modules, e.g. functional ``F.gelu``) leaves out the dead-unit and saturation
    charts, which would stay empty.
    """
    p = re.escape(prefix)

    def per_layer(metric: str) -> list[str]:
        return [rf"^{p}{metric}/\d+\."]

    totals = "|".join(["grad_norm", *extra_totals])
    charts: dict[str, list] = {
        "gradient norm per layer (input to output)": ["Multiline", per_layer("grad_norm")],
        "gradient / weight norm per layer": ["Multiline", per_layer("grad_to_weight")],
        "max |gradient| per layer": ["Multiline", per_layer("grad_max_abs")],
        "total gradient norm and clipping threshold": ["Multiline", [rf"^{p}({totals})/{TOTAL}$"]],
    }
    if activations:
        charts["dead-unit fraction per activation"] = ["Multiline", per_layer("dead_frac")]
        charts["saturated fraction per activation"] = ["Multiline", per_layer("saturated_frac")]
    charts.update({
        "non-finite gradient values per layer": ["Multiline", per_layer("nonfinite")],
        "zero-gradient fraction per layer": ["Multiline", per_layer("grad_zero_frac")],
        "update / weight norm per layer": ["Multiline", per_layer("update_ratio")],
        "loss": ["Multiline", [rf"^{p}loss/{TOTAL}$"]],
    })
    return {LAYOUT_CATEGORY: charts}
