"""TensorBoard output: per-layer scalars, device-binned histograms, a one-page dashboard, the
gradient-flow figure and the diagnosis as text.

``gradwatch.watch(model, log_dir=...)`` creates a :class:`TensorBoardSink`; it can also be used on
its own with any watcher (``gradwatch.watch(model, sinks=[TensorBoardSink(writer)])``).

What is written (tags: see :mod:`gradwatch.tags`; ``NN`` is the layer's zero-padded depth):

- every collected step, as **one** event, handed to the writer as it arrives: ``<metric>/NN.<layer>`` for every gradient metric
  (``grad_norm``, ``grad_mean_abs``, ``grad_max_abs``, ``grad_zero_frac``, ``nonfinite``,
  ``weight_norm``, ``grad_to_weight``, ``update_ratio``; metrics not measured on a step are
  skipped), ``grad_norm/total``, ``loss/total`` and extra scalars such as ``clip_threshold/total``;
  on activation-sampled steps also ``dead_frac``, ``saturated_frac``, ``unit_samples`` per
  activation and ``act_rms``, ``out_grad_rms`` (...) per layer;
- every ``histogram_every_n_steps``: ``grad_hist/NN.<layer>`` (values) and
  ``grad_log10abs/NN.<layer>`` (log10|g|), binned on the gradients' device (see
  :mod:`gradwatch.histograms`), and ``hist_zeros``, ``hist_nan``, ``hist_inf`` counts per layer;
  optionally ``weight_hist/NN.<layer>``;
- once per writer: a custom-scalars layout ("gradwatch" category, CUSTOM SCALARS tab);
- every ``figure_every_n_steps`` and at close: the gradient-flow figure ``gradwatch/gradient_flow``;
- whenever the set of findings changes: the diagnosis report as text (``gradwatch/diagnosis``);
- the run's metadata (layer types and depths, activation kinds, thresholds) under
  ``gradwatch/meta`` in a plugin TensorBoard does not display, so that ``gradwatch report`` can
  rebuild the run and diagnose it exactly as the live watcher did.

Nothing is lost: the sink keeps no events of its own (the watcher's step buffer is the one place
records wait); events go through the writer's thread and reach the disk every ``flush_secs``, on
``flush()`` and ``close()``, and at interpreter exit (a weakly referenced ``atexit`` hook, also
reached when training dies with an exception, which first records the source's buffered steps); a
killed run leaves readable files up to the last flush.

Cost: a step's scalars are encoded straight into the serialized ``Event`` from cached per-tag
bytes and queued as bytes: no protobuf objects on the training thread, which saves 0.7 ms a step
at 100 layers and 3.8 ms at 500 (``benchmarks/scalar_encoding.py``).

The sink wires the parts, one module each: :mod:`gradwatch.tensorboard_writer` (the writer, failures),
:mod:`gradwatch.tensorboard_events` (event bytes), :mod:`gradwatch.tensorboard_scalars` (a step's
scalars), :mod:`gradwatch.tensorboard_histograms`, :mod:`gradwatch.tensorboard_figure` and
:mod:`gradwatch.tensorboard_meta` (the run's metadata).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import warnings
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

from tensorboard.compat.proto.summary_pb2 import Summary

from gradwatch import tags as T
from gradwatch.tensorboard_events import event_bytes
from gradwatch.tensorboard_figure import RecentFlow
from gradwatch.tensorboard_histograms import PendingHistogramSummary, launch_histograms
from gradwatch.tensorboard_meta import meta_value, run_meta
from gradwatch.tensorboard_scalars import ScalarTags
from gradwatch.tensorboard_writer import EventWriter

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from gradwatch.findings import Diagnosis
    from gradwatch.layers import LayerInfo
    from gradwatch.sinks import RunSource, StepRecord

log = logging.getLogger("gradwatch")

_DEFAULT_FIGURE_EVERY = 2000
_DEFAULT_WINDOW = 50
_LIVE: weakref.WeakSet[TensorBoardSink] = weakref.WeakSet()


def _close_live_sinks() -> None:
    """atexit: flush every sink still open (weak references: closed or collected sinks are gone)."""
    for sink in list(_LIVE):
        sink._at_exit()


atexit.register(_close_live_sinks)


class TensorBoardSink:
    """Writes a watcher's statistics, histograms, dashboard layout, figure and diagnosis to TensorBoard.

    Args:
        log_dir: a directory (a ``SummaryWriter`` is created there and closed by :meth:`close`) or
            an existing ``torch.utils.tensorboard.SummaryWriter`` (e.g. a Lightning
            ``TensorBoardLogger.experiment``): written to and flushed, never closed.
        watcher: the run feeding this sink, if any (a :class:`~gradwatch.sinks.RunSource`, e.g. a
            ``GradWatcher``): its layer/activation metadata, thresholds and figure cadence are used,
            and its buffered steps are recorded at interpreter exit.
            ``gradwatch.watch(log_dir=...)`` passes itself.
        histograms: write gradient histograms when the watcher asks (``histogram_every_n_steps``).
        weight_histograms: also write ``weight_hist/<layer>`` on histogram steps.
        figure_every_n_steps: log the gradient-flow figure every n collected steps (0: only at
            close). Default: the watcher's ``figure_every_n_steps``, else 2000. Rendering takes
            0.1-1 s on the training thread (more layers, longer), hence the sparse default: at 500 it
            cost a deep MLP ~1 % of its training time, and TensorBoard keeps 10 images per tag by
            default (``--samples_per_plugin images=N``) however many are written.
        text: write the diagnosis report as text when the findings change.
        layout: write the custom-scalars dashboard layout (once per writer).
        prefix: prepended to every tag (e.g. ``"gradwatch/"``) when the writer is shared with
            metrics whose names could collide; recorded so ``gradwatch report`` strips it.
        flush_secs: for a writer created here, how often pending events reach the disk: what a
            killed run can lose at most.
        fast_crc: compute the writer's record checksums with google-crc32c (C) instead of
            TensorBoard's byte-at-a-time Python loop (identical files, far less CPU in the writer
            thread; see :mod:`gradwatch.checksums`). Applies to that writer only.
        write_every_n_steps: deprecated and ignored: each step's event goes to the writer as it
            arrives (the watcher batches steps before the sinks; the writer's thread writes them).

    Raises:
        TypeError: ``log_dir`` is neither a path nor a writer, or an option has the wrong type.
        ValueError: an option is out of range.

    Example:
        >>> watcher = gradwatch.watch(model, log_dir="runs/exp1")          # creates this sink
        >>> sink = TensorBoardSink(trainer.logger.experiment, prefix="gw/")  # or by hand
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | SummaryWriter,
        *,
        watcher: RunSource | None = None,
        histograms: bool = True,
        weight_histograms: bool = False,
        figure_every_n_steps: int | None = None,
        text: bool = True,
        layout: bool = True,
        prefix: str = "",
        flush_secs: float = 10.0,
        fast_crc: bool = True,
        write_every_n_steps: int | None = None,
    ):
        if not isinstance(prefix, str) or (prefix and not prefix.endswith(("/", "_", "."))):
            raise ValueError(f"prefix must be a string ending in '/', '_' or '.' (e.g. 'gradwatch/'), got {prefix!r}")
        if figure_every_n_steps is not None and (
            isinstance(figure_every_n_steps, bool) or not isinstance(figure_every_n_steps, int) or figure_every_n_steps < 0
        ):
            raise ValueError(f"figure_every_n_steps must be an integer >= 0 (0 = only at close), got {figure_every_n_steps!r}")
        if write_every_n_steps is not None:
            if isinstance(write_every_n_steps, bool) or not isinstance(write_every_n_steps, int) or write_every_n_steps < 1:
                raise ValueError(f"write_every_n_steps must be an integer >= 1 (1 = hand every step to the writer at "
                                 f"once), got {write_every_n_steps!r}")
            warnings.warn("TensorBoardSink(write_every_n_steps=...) is deprecated and ignored: every step's event goes "
                          "to the writer as it arrives", DeprecationWarning, stacklevel=2)
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, int | float) or not flush_secs > 0:
            raise ValueError(f"flush_secs must be a positive number of seconds, got {flush_secs!r}")
        self._out = EventWriter(log_dir, flush_secs=flush_secs, fast_crc=fast_crc)
        self.writer = self._out.writer
        self.owns_writer = self._out.owns_writer
        #: whether the writer got the fast record checksum (see :mod:`gradwatch.checksums`)
        self.fast_crc = self._out.fast_crc
        self.watcher = watcher
        self.histograms = bool(histograms)
        self.weight_histograms = bool(weight_histograms)
        if figure_every_n_steps is None:
            figure_every_n_steps = getattr(watcher, "figure_every_n_steps", _DEFAULT_FIGURE_EVERY)
        self.figure_every_n_steps = int(figure_every_n_steps)
        self.text = bool(text)
        self.layout = bool(layout)
        self.prefix = prefix
        self.closed = False
        self.steps_written = 0
        self._tags = ScalarTags(prefix)
        self._meta_context: dict[str, Any] | None = None
        #: launched histogram steps whose counts may still be on their way to the host (accelerators)
        self._histograms_in_flight: deque[tuple[int, PendingHistogramSummary]] = deque()
        self._recent = RecentFlow(getattr(getattr(watcher, "thresholds", None), "window", _DEFAULT_WINDOW))
        self._diagnosis: Diagnosis | None = None
        self._text_signature: tuple | None = None
        self._last_step: int | None = None
        self._last_figure_step: int | None = None
        _LIVE.add(self)

    def _update_tags(self, layers: list[str], activations: list[str], step: int) -> None:
        """Follow the record's layers; (re)write the run's metadata when they or the run's context changed."""
        if not self._tags.update(layers, activations):
            context = getattr(getattr(self.watcher, "history", None), "context", None)
            if context is None or context == self._meta_context:
                return  # e.g. AMP loss scaling noticed later: written again below
        meta, self._meta_context = run_meta(self.watcher, self.prefix, layers, self._tags.layer_keys, activations,
                                            list(self._tags.act_keys))
        self._out.add_summary([meta_value(self.prefix, meta)], step)

    # -- Sink protocol -----------------------------------------------------------------------------
    def write_step(self, record: StepRecord) -> None:
        """Write one collected step's scalars as a single event (cheap: one proto, no per-tag calls)."""
        if self.closed:
            return
        try:
            first = self._tags.empty
            self._update_tags(record.layers, record.activations, record.step)
            if first and self.layout:  # no activation modules (functional activations): no forever-empty charts
                self._out.add_layout(self.prefix, activations=bool(record.activations))
            self._out.write_event(event_bytes(self._tags.encode(record), record.step, time.time()))
            self._recent.add(record.step, record.layers, record.values)
            self._last_step = record.step
            self.steps_written += 1
        except Exception as exc:
            self._out.failed("scalars", exc)
            return
        if self._histograms_in_flight:
            self._write_histograms(wait=False)
        every = self.figure_every_n_steps
        if every and self.steps_written % every == 0:
            self.write_figure(record.step)

    def write_histograms(self, step: int, layers: list[LayerInfo]) -> None:
        """Bin every layer's gradients (and optionally weights) on device; write raw histograms.

        All histograms and counts of the step go out as one event, serialized from packed arrays (the
        same ``HistogramProto`` that ``add_histogram_raw`` writes).
        """
        if self.closed or not self.histograms:
            return
        try:
            if self._out.writable("histograms") is None:
                return
            pending = launch_histograms(layers, self._tags.layer_key, self.prefix, weights=self.weight_histograms)
            self._histograms_in_flight.append((step, pending))
        except Exception as exc:
            self._out.failed("histograms", exc)
            return
        self._write_histograms(wait=False)

    def _write_histograms(self, wait: bool) -> None:
        """Write the launched histogram steps whose counts reached the host, in launch order (all of
        them with ``wait``)."""
        queue = self._histograms_in_flight
        while queue and (wait or queue[0][1].ready()):
            step, pending = queue.popleft()
            try:
                summary = pending.encode()
                if summary:
                    self._out.write_event(event_bytes(summary, step, time.time()))
            except Exception as exc:
                self._out.failed("histograms", exc)

    def write_diagnosis(self, step: int, diagnosis: Diagnosis) -> None:
        """Remember the diagnosis (for the figure); write it as text when its findings changed."""
        if self.closed:
            return
        self._diagnosis = diagnosis
        if not self.text:
            return
        try:
            sig = diagnosis.signature()
            if sig == self._text_signature:
                return
            self._text_signature = sig
            self._out.add_text(self.prefix + T.DIAGNOSIS_TAG, diagnosis_markdown(diagnosis, step), step, "diagnosis")
        except Exception as exc:
            self._out.failed("diagnosis text", exc)

    def write_text(self, tag: str, text: str, step: int) -> None:
        """Free text under ``tag`` (e.g. what auto-fix did), shown in TensorBoard's TEXT tab."""
        if self.closed or not self.text:
            return
        try:
            self._out.add_text(self.prefix + tag, text, step, "text")
        except Exception as exc:
            self._out.failed("text", exc)

    def write_figure(self, step: int | None = None) -> None:
        """Render the gradient-flow figure from the recent steps and log it as an image."""
        if step is None:
            step = self._last_step
        if step is None or not self._recent or step == self._last_figure_step:
            return
        try:
            image = self._recent.image(step, self._diagnosis)
            if self._out.add_summary([Summary.Value(tag=self.prefix + T.FIGURE_TAG, image=image)], step, "figure"):
                self._last_figure_step = step
        except Exception as exc:
            self._out.failed("figure", exc)

    def flush(self) -> None:
        """Push the writer's queued events to disk (histograms still on their way to the host first)."""
        self._write_histograms(wait=True)
        self._out.flush()

    def close(self) -> None:
        """Log the final figure, flush, and close the writer if this sink created it. Idempotent."""
        if self.closed:
            return
        self.write_figure()
        self.flush()
        self.closed = True
        _LIVE.discard(self)
        self._out.close()

    def _at_exit(self) -> None:
        """Interpreter exit without ``close()``: the source's buffered steps are recorded, then the writer
        flushed (no figure: matplotlib may be gone)."""
        if self.closed:
            return
        if self.watcher is not None:
            try:
                self.watcher.record_pending()
            except Exception as exc:
                self._out.failed("pending steps", exc)
        self.flush()
        self.closed = True
        self._out.close(report=False)

    def __repr__(self) -> str:
        where = getattr(self.writer, "log_dir", None) or getattr(self.writer, "logdir", "?")
        return f"TensorBoardSink({where!r}, owns_writer={self.owns_writer}, closed={self.closed})"


def diagnosis_markdown(diagnosis: Diagnosis, step: int) -> str:
    """The diagnosis as TensorBoard text: a one-line verdict, then the report as a code block."""
    if diagnosis.healthy:
        head = f"**step {step}: healthy**"
    else:
        kinds = "; ".join(f"{f.kind} ({f.severity}) in {', '.join(f.layers[:4])}{'...' if len(f.layers) > 4 else ''}"
                          for f in diagnosis.findings)
        head = f"**step {step}: {kinds}**"
    body = "\n".join("    " + line for line in str(diagnosis).splitlines())
    return f"{head}\n\n{body}\n"


__all__ = ["TensorBoardSink", "diagnosis_markdown"]
