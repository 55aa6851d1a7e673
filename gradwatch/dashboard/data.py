"""The dashboard's data, as pure functions over numpy arrays (no TensorBoard, no torch).

Kept apart from the plugin so that the maths (which rows, which steps, what a downsampled cell
holds) is tested directly against a brute-force computation, and so that loading the plugin does
not import torch (TensorBoard imports every installed plugin at start-up).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch import tags as T

#: How a downsampled cell summarises the values it covers (the user's choice in the tab).
AGGREGATES: tuple[str, ...] = ("median", "min", "max")
#: The metric shown first: scale-free, so layers of different sizes compare on one colour scale.
DEFAULT_METRIC = "grad_to_weight"
_KIND_RE = re.compile(r"\b([a-z_]+) \((warning|critical)\)")
_LAYERS_RE = re.compile(r"^\s*layers: (.*)$", re.MULTILINE)
_MORE_RE = re.compile(r" \(\+(\d+) more\)\s*$")


@dataclass(frozen=True)
class Series:
    """One per-layer series of a run: ``tag`` holds ``metric`` for the layer ``layer`` at ``depth``."""

    tag: str
    metric: str
    layer: str
    depth: int


@dataclass
class RunTags:
    """What a run holds, from its scalar tag names alone.

    Attributes:
        prefix: the tag prefix gradwatch wrote with (``""``, or e.g. ``"gradwatch/"`` in Lightning runs).
        series: ``metric -> per-layer series in depth order`` (input first).
        totals: ``metric -> tag`` of the global series (``grad_norm/total``, ``loss/total``).
    """

    prefix: str
    series: dict[str, list[Series]]
    totals: dict[str, str]

    @property
    def metrics(self) -> list[str]:
        """Per-layer metrics, the default one first, then in name order."""
        return sorted(self.series, key=lambda m: (m != DEFAULT_METRIC, m))


def detect_prefix(tags: Iterable[str]) -> str | None:
    """The prefix under which gradwatch wrote ``grad_norm/total`` (the shortest), or ``None``
    when the run holds no gradwatch data (other people's runs are then not listed)."""
    suffix = T.total_tag("grad_norm")
    hits = sorted({t[: -len(suffix)] for t in tags if t.endswith(suffix)}, key=len)
    return hits[0] if hits else None


def run_tags(tags: Iterable[str]) -> RunTags | None:
    """Group a run's scalar tags into gradwatch series (``None``: not a gradwatch run).

    Depth order comes from the zero-padded depth in the tag (``grad_norm/03.net.4``), which
    gradwatch writes from the forward order it records (see :mod:`gradwatch.tags`).
    """
    tags = list(tags)
    prefix = detect_prefix(tags)
    if prefix is None:
        return None
    series: dict[str, list[Series]] = {}
    totals: dict[str, str] = {}
    for tag in tags:
        parsed = T.parse_tag(tag, prefix)
        if parsed is None or "/" in parsed.metric:
            continue
        if parsed.depth is None:
            totals[parsed.metric] = tag
        else:
            series.setdefault(parsed.metric, []).append(Series(tag, parsed.metric, parsed.layer, parsed.depth))
    for rows in series.values():
        rows.sort(key=lambda s: (s.depth, s.layer))
    return RunTags(prefix, series, totals)


#: ``gradwatch demo`` writes ``<case>/before`` and ``<case>/after``: listed in that order, not alphabetically.
_PHASES = {"before": 0, "after": 1}


def run_order(run: str) -> tuple[str, int, str]:
    """Sort key of run names: by parent directory, ``before`` ahead of ``after``, then by name."""
    parent, _, last = run.rpartition("/")
    return parent, _PHASES.get(last, 2), last


def dense(columns: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-row ``(steps, values)`` series into ``(steps, matrix)``: the union of the steps,
    and a float32 ``rows x steps`` matrix holding NaN where a row has no value at a step."""
    if not columns:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    steps = np.unique(np.concatenate([s for s, _ in columns])) if columns else np.zeros(0, dtype=np.int64)
    matrix = np.full((len(columns), len(steps)), np.nan, dtype=np.float32)
    for i, (s, v) in enumerate(columns):
        matrix[i, np.searchsorted(steps, s)] = v
    return steps, matrix


def cell_size(n: int, cells: int) -> int:
    """How many consecutive rows (or steps) one cell covers so that ``n`` fit in ``cells``."""
    return max(1, math.ceil(n / max(1, cells)))


def downsample(matrix: np.ndarray, rows: int, cols: int, agg: str) -> tuple[np.ndarray, int, int]:
    """Reduce a ``layers x steps`` matrix to at most ``rows x cols`` cells.

    Cell ``(i, j)`` covers layers ``[i*r, (i+1)*r)`` and step indices ``[j*k, (j+1)*k)`` (the last
    cells may cover fewer) and holds the ``agg`` (``"min"``, ``"median"``, ``"max"``) of the
    finite-or-infinite values there, ignoring missing ones (NaN when all are missing). Blocks of
    equal size make this one reshape and one reduction: 500 x 10,000 values take ~0.1 s.

    Returns:
        ``(cells, r, k)``.

    Raises:
        ValueError: ``agg`` is not one of :data:`AGGREGATES`.
    """
    if agg not in AGGREGATES:
        raise ValueError(f"agg must be one of {', '.join(AGGREGATES)}, got {agg!r}")
    n_rows, n_cols = matrix.shape
    r, k = cell_size(n_rows, rows), cell_size(n_cols, cols)
    if r == 1 and k == 1:
        return matrix.astype(np.float32, copy=True), 1, 1
    out_rows, out_cols = math.ceil(n_rows / r) if n_rows else 0, math.ceil(n_cols / k) if n_cols else 0
    padded = np.full((out_rows * r, out_cols * k), np.nan, dtype=np.float32)
    padded[:n_rows, :n_cols] = matrix
    blocks = padded.reshape(out_rows, r, out_cols, k).transpose(0, 2, 1, 3).reshape(out_rows, out_cols, r * k)
    if not blocks.size:
        return np.zeros((out_rows, out_cols), dtype=np.float32), r, k
    if agg == "median":
        return _nanmedian_last_axis(blocks), r, k
    import warnings

    with warnings.catch_warnings():  # an all-missing cell is NaN, which is what it should be
        warnings.simplefilter("ignore", RuntimeWarning)
        cells = (np.nanmin if agg == "min" else np.nanmax)(blocks, axis=2)
    return cells.astype(np.float32), r, k


def _nanmedian_last_axis(blocks: np.ndarray) -> np.ndarray:
    """``np.nanmedian(blocks, axis=-1)``, 5-10x faster on many small cells: one sort (NaN sorts
    last), then the middle one or two of each cell's ``n`` present values."""
    ordered = np.sort(blocks, axis=-1)
    n = np.count_nonzero(~np.isnan(blocks), axis=-1)
    lo = np.maximum(n - 1, 0) // 2
    hi = n // 2 - (n == 0)
    low = np.take_along_axis(ordered, lo[..., None], axis=-1)[..., 0].astype(np.float64)
    high = np.take_along_axis(ordered, np.maximum(hi, 0)[..., None], axis=-1)[..., 0].astype(np.float64)
    median = (low + high) / 2
    median[n == 0] = np.nan
    return median.astype(np.float32)


def decades(values: np.ndarray) -> tuple[float, float] | None:
    """The colour range in whole decades: ``floor(log10(min))``..``ceil(log10(max))`` of the
    positive finite values (``None`` if there are none). Zeros and negatives have no log; the
    frontend draws them in a separate colour."""
    v = values[np.isfinite(values) & (values > 0)]
    if not v.size:
        return None
    lo, hi = math.floor(math.log10(float(v.min()))), math.ceil(math.log10(float(v.max())))
    return float(lo), float(max(hi, lo + 1))


def step_bins(steps: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """First and last step of each column of ``k`` consecutive steps."""
    first = steps[::k]
    last = steps[np.minimum(np.arange(len(first)) * k + k - 1, len(steps) - 1)] if len(steps) else steps
    return [int(s) for s in first], [int(s) for s in last]


@dataclass(frozen=True)
class Finding:
    """A change of the diagnosis, as gradwatch logged it (one text per change).

    ``layers`` are the layers the report lists for its findings (the report names the first 8
    of each finding; ``more`` counts the rest), limited to layers the run has series for.
    """

    step: int
    headline: str
    text: str
    kinds: list[str]
    layers: list[str]
    more: int


def parse_findings(texts: Iterable[tuple[int, str]], layer_names: Iterable[str]) -> list[Finding]:
    """Findings from gradwatch's diagnosis texts (``gradwatch/diagnosis``, written when the findings
    change, see :func:`gradwatch.tensorboard.diagnosis_markdown`): the finding kinds of the
    headline, and the layers of the report's ``layers:`` lines."""
    known = set(layer_names)
    out = []
    for step, text in sorted(texts, key=lambda t: t[0]):
        headline = text.strip().splitlines()[0].strip("* ") if text.strip() else ""
        kinds = list(dict.fromkeys(m.group(1) for m in _KIND_RE.finditer(headline)))
        named: dict[str, None] = {}
        more = 0
        for m in _LAYERS_RE.finditer(text):
            listed, extra = m.group(1), _MORE_RE.search(m.group(1))
            if extra:
                more += int(extra.group(1))
                listed = listed[: extra.start()]
            named.update((name, None) for name in (n.strip() for n in listed.split(", ")) if name in known)
        out.append(Finding(int(step), headline, text, kinds, list(named), more))
    return out


def total_series(rows: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, list]]:
    """JSON-ready ``{name: {"steps": [...], "values": [...]}}`` (NaN and inf as ``None``)."""
    return {name: {"steps": [int(s) for s in steps], "values": finite_list(values)} for name, (steps, values) in rows.items()}


def finite_list(values: np.ndarray) -> list[float | None]:
    """Values for JSON (which has no NaN or infinity): non-finite values become ``None``."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).tolist()]
