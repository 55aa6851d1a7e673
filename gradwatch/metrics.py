"""The metric schema: every per-layer number gradwatch records, defined once.

Each :class:`Metric` says what users see (its ``name``: the DataFrame's ``metric`` column and the
TensorBoard tag ``<name>/<depth>.<layer>``), when it is measured (:class:`Cadence`), how shards of a
sharded parameter combine into it, and its column in the history's arrays. Collection, the
history, the sinks, the log reader and the diagnosis take their indices and names from here, so
adding a metric is one entry below plus its computation in :mod:`gradwatch.collect`.

Gradient metrics are derived on the host from a few per-layer *partials* computed on the device
(:data:`PARTIALS`): sums that add up across the shards of a sharded parameter, and a maximum. A
sharded run all-reduces the partials (:func:`gradwatch.collect_shards.reduce_sharded_rows`), then
derives the metrics exactly as a single process does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum


class Cadence(StrEnum):
    """When a metric is measured (others steps record NaN: "not measured")."""

    EVERY_STEP = "every_step"          # every collected step
    SLOW_STEP = "slow_step"            # every ``slow_stats_every_n``-th collected step
    AFTER_SLOW_STEP = "after_slow_step"  # the collected step after a slow step (one optimizer update later)
    SAMPLE = "sample"                  # activation-sampled steps (``activation_every_n_steps``)


class ShardReduce(StrEnum):
    """How a device-side partial combines across the shards of one layer."""

    SUM = "sum"
    MAX = "max"


@dataclass(frozen=True)
class Partial:
    """One row of the on-device statistics, before metrics are derived from it."""

    name: str
    row: int
    reduce: ShardReduce
    doc: str


#: device rows, in row order (``rows[partial.row, layer]``)
PARTIALS: tuple[Partial, ...] = tuple(Partial(name, i, reduce, doc) for i, (name, reduce, doc) in enumerate((
    ("sumsq", ShardReduce.SUM, "sum of squared finite gradient elements"),
    ("l1", ShardReduce.SUM, "sum of |g| (slow steps)"),
    ("max_abs", ShardReduce.MAX, "largest |g| (slow steps)"),
    ("numel", ShardReduce.SUM, "gradient elements held"),
    ("zeros", ShardReduce.SUM, "exactly-zero gradient elements (slow steps)"),
    ("weight_sumsq", ShardReduce.SUM, "sum of squared weights (slow steps)"),
    ("update_sumsq", ShardReduce.SUM, "||w_t - w_{t+1}||^2 of one optimizer step"),
    ("snapshot_sumsq", ShardReduce.SUM, "||w_t||^2 of the weights that update started from"),
)))
#: row index of each partial by name
ROW: dict[str, int] = {p.name: p.row for p in PARTIALS}
#: rows that add up across shards, and the one that takes the maximum
SUM_ROWS: list[int] = [p.row for p in PARTIALS if p.reduce is ShardReduce.SUM]
MAX_ROWS: list[int] = [p.row for p in PARTIALS if p.reduce is ShardReduce.MAX]


@dataclass(frozen=True)
class Metric:
    """One recorded metric.

    Attributes:
        name: as users see it (DataFrame ``metric`` column, TensorBoard tag prefix).
        table: ``"grad"`` (per layer, collected steps), ``"activation"`` (per activation module,
            sampled steps) or ``"signal"`` (per layer, sampled steps).
        column: its index along the last axis of that table's history arrays.
        cadence: when it is measured.
        reduce: how it is formed from the shard-reduced partials (``"local"``: not reduced, each
            process records its own).
        doc: what it measures.
    """

    name: str
    table: str
    column: int
    cadence: Cadence
    reduce: str
    doc: str


class MetricTable:
    """The metrics of one history table in column order; ``table["name"]`` is the column index."""

    def __init__(self, table: str, entries: tuple[tuple[str, Cadence, str, str], ...]):
        self.table = table
        self.metrics: tuple[Metric, ...] = tuple(
            Metric(name, table, i, cadence, reduce, doc) for i, (name, cadence, reduce, doc) in enumerate(entries))
        self.names: tuple[str, ...] = tuple(m.name for m in self.metrics)
        self._column = {m.name: m.column for m in self.metrics}

    def __getitem__(self, name: str) -> int:
        try:
            return self._column[name]
        except KeyError:
            raise KeyError(f"unknown {self.table} metric {name!r}; allowed: {', '.join(self.names)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._column

    def __iter__(self) -> Iterator[Metric]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)


GRAD = MetricTable("grad", (
    ("grad_norm", Cadence.EVERY_STEP, "sqrt(sum sumsq)", "L2 norm of the layer's finite gradient values"),
    ("grad_mean_abs", Cadence.SLOW_STEP, "sum l1 / sum numel", "mean |g| over the elements that have a gradient"),
    ("grad_max_abs", Cadence.SLOW_STEP, "max max_abs", "largest finite |g|"),
    ("grad_zero_frac", Cadence.SLOW_STEP, "sum zeros / sum numel", "fraction of exactly-zero gradient elements"),
    ("nonfinite", Cadence.EVERY_STEP, "counted where sum sumsq is non-finite", "count of NaN/Inf gradient elements"),
    ("weight_norm", Cadence.SLOW_STEP, "sqrt(sum weight_sumsq)", "L2 norm of the layer's parameters"),
    ("grad_to_weight", Cadence.EVERY_STEP, "grad_norm / latest weight_norm", "gradient norm over weight norm"),
    ("update_ratio", Cadence.AFTER_SLOW_STEP, "sqrt(sum update_sumsq / sum snapshot_sumsq)",
     "||w_{t+1} - w_t|| / ||w_t|| of one optimizer step"),
))
ACTIVATION = MetricTable("activation", (
    ("dead_frac", Cadence.SAMPLE, "local", "fraction of ReLU-family units inactive for the whole batch"),
    ("saturated_frac", Cadence.SAMPLE, "local", "fraction of outputs in the activation's flat region"),
    ("unit_samples", Cadence.SAMPLE, "local", "values each unit's deadness was judged on"),
))
SIGNAL = MetricTable("signal", (
    ("act_rms", Cadence.SAMPLE, "local", "RMS of the layer's output (forward signal)"),
    ("out_grad_rms", Cadence.SAMPLE, "local", "RMS of dL/d(output) (backward signal)"),
    ("time_decay_decades", Cadence.SAMPLE, "local",
     "recurrent layers: decades dL/dx_t at the first time steps sits below the last ones"),
))

#: every metric, all tables
METRICS: tuple[Metric, ...] = (*GRAD, *ACTIVATION, *SIGNAL)

#: metric names in column order (the history's, the sinks' and the logs' vocabulary)
GRAD_METRICS: tuple[str, ...] = GRAD.names
ACT_METRICS: tuple[str, ...] = ACTIVATION.names
LAYER_SIGNAL_METRICS: tuple[str, ...] = SIGNAL.names

__all__ = ["ACTIVATION", "ACT_METRICS", "GRAD", "GRAD_METRICS", "LAYER_SIGNAL_METRICS", "MAX_ROWS", "METRICS",
           "PARTIALS", "ROW", "SIGNAL", "SUM_ROWS", "Cadence", "Metric", "MetricTable", "Partial", "ShardReduce"]
