"""Where ``GradWatchCallback`` sends its numbers: the Trainer's loggers.

A :class:`~lightning.pytorch.loggers.TensorBoardLogger` gets gradwatch's full TensorBoard sink in its
own run directory (``logger.experiment``); every other logger gets the per-layer scalars through
``Logger.log_metrics`` (:class:`LoggerSink`, the ``LearningRateMonitor`` route).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gradwatch.activations import ACT_METRICS
from gradwatch.collect import GRAD_METRICS
from gradwatch.findings import FINDING_KINDS, Diagnosis
from gradwatch.sinks import Sink, StepRecord

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from gradwatch.layers import LayerInfo
    from gradwatch.watcher import GradWatcher

#: Metrics sent to loggers' ``log_metrics`` by default (one scalar per layer and metric).
DEFAULT_METRICS: tuple[str, ...] = ("grad_norm", "grad_to_weight", "update_ratio", "nonfinite", "dead_frac", "saturated_frac")
#: Metrics that may be sent to loggers' ``log_metrics``.
LOGGABLE_METRICS: tuple[str, ...] = GRAD_METRICS + ("dead_frac", "saturated_frac")
_SEVERITY_LEVEL = {"warning": 1.0, "critical": 2.0}


def make_sinks(trainer: Trainer, watcher: GradWatcher, metrics: Sequence[str], log_every_n_steps: int | None) -> list[Sink]:
    """One sink per TensorBoard logger, one :class:`LoggerSink` for all the other loggers of ``trainer``.

    ``log_every_n_steps``: the cadence of ``log_metrics`` (``None``: the Trainer's own).
    """
    loggers = list(trainer.loggers)
    sinks: list[Sink] = []
    others: list[Logger] = []
    for logger in loggers:
        sink = tensorboard_sink(logger, watcher) if isinstance(logger, TensorBoardLogger) else None
        if sink is None:
            others.append(logger)
        else:
            sinks.append(sink)
    if others:
        has_tensorboard = bool(sinks)
        every = log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))
        sinks.append(LoggerSink(others, metrics, every))
        if not has_tensorboard:
            rank_zero_info(
                "gradwatch: histograms and gradient-flow figures need a TensorBoardLogger; with "
                f"{', '.join(type(lg).__name__ for lg in others)} only per-layer scalars are logged "
                "(through log_metrics)"
            )
    return sinks


def tensorboard_sink(logger: TensorBoardLogger, watcher: GradWatcher) -> Sink | None:
    """Everything (scalars, histograms, layout, figures, diagnosis text) into the logger's own run directory."""
    try:
        from gradwatch.tensorboard import TensorBoardSink
    except ImportError:  # pragma: no cover - only in a core without TensorBoard support
        return None
    return TensorBoardSink(logger.experiment, watcher=watcher)


class LoggerSink:
    """Per-layer scalars through ``Logger.log_metrics`` (the ``LearningRateMonitor`` route).

    Keys are ``<metric>/<layer>`` with the layer named as in ``to_dataframe()`` (``grad_norm/total`` for
    the global norm); values that were not
    measured on a step (slow-cadence metrics, layers without gradient) are left out.
    """

    def __init__(self, loggers: Sequence[Logger], metrics: Sequence[str], every: int) -> None:
        self.loggers = list(loggers)
        self.every = every
        self._grad = [(GRAD_METRICS.index(m), m) for m in metrics if m in GRAD_METRICS]
        self._act = [(ACT_METRICS.index(m), m) for m in metrics if m in ACT_METRICS]

    def write_step(self, record: StepRecord) -> None:
        if record.step % self.every:
            return
        out: dict[str, float] = {}
        values = record.values
        for i, layer in enumerate(record.layers):
            for j, metric in self._grad:
                v = float(values[i, j])
                if math.isfinite(v):
                    out[f"{metric}/{layer}"] = v
        if record.act_values is not None:
            for i, name in enumerate(record.activations):
                for j, metric in self._act:
                    v = float(record.act_values[i, j])
                    if math.isfinite(v):
                        out[f"{metric}/{name}"] = v
        if math.isfinite(record.total_norm):
            out["grad_norm/total"] = float(record.total_norm)
        for key, value in record.extra.items():
            out[key] = float(value)
        if out:
            for logger in self.loggers:
                logger.log_metrics(out, step=record.step)

    def write_histograms(self, step: int, layers: list[LayerInfo]) -> None:
        pass

    def write_diagnosis(self, step: int, diagnosis: Diagnosis) -> None:
        out = {"gradwatch/healthy": float(diagnosis.healthy)}
        for kind in FINDING_KINDS:
            out[f"gradwatch/{kind}"] = max((_SEVERITY_LEVEL[f.severity] for f in diagnosis.by_kind(kind)), default=0.0)
        for logger in self.loggers:
            logger.log_metrics(out, step=step)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.save()

    def close(self) -> None:
        self.flush()


__all__ = ["DEFAULT_METRICS", "LOGGABLE_METRICS", "LoggerSink", "make_sinks", "tensorboard_sink"]
