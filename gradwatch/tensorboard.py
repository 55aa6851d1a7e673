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
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import struct
import time
import warnings
import weakref
from collections import deque
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

from gradwatch import tags as T
from gradwatch.histograms import HistogramData, bin_on_device
from gradwatch.metrics import ACT_METRICS, GRAD, GRAD_METRICS, LAYER_SIGNAL_METRICS

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from gradwatch.findings import Diagnosis
    from gradwatch.layers import LayerInfo
    from gradwatch.sinks import RunSource, StepRecord

log = logging.getLogger("gradwatch")

META_FORMAT = 1
_DEFAULT_FIGURE_EVERY = 500
_DEFAULT_WINDOW = 50
_MAX_QUEUE = 64
_LIVE: weakref.WeakSet[TensorBoardSink] = weakref.WeakSet()
# writers that already hold a gradwatch layout (add_custom_scalars may be called once per writer)
_LAYOUT_WRITTEN: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _close_live_sinks() -> None:
    """atexit: flush every sink still open (weak references: closed or collected sinks are gone)."""
    for sink in list(_LIVE):
        sink._at_exit()


atexit.register(_close_live_sinks)


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=True)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _value_prefix(tag: str) -> bytes:
    """Serialized ``Summary.value`` entry up to its float: ``value { tag: <tag> simple_value: ...``."""
    t = tag.encode("utf-8")
    inner = b"\x0a" + _varint(len(t)) + t + b"\x15"  # field 1 (tag, bytes), field 2 (simple_value, fixed32)
    return b"\x0a" + _varint(len(inner) + 4) + inner


def _event_bytes(summary: bytes, step: int, wall_time: float) -> bytes:
    """A serialized ``Event`` (wall_time = 1, step = 2, summary = 5) around a serialized ``Summary``."""
    return (b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(int(step) & 0xFFFFFFFFFFFFFFFF)
            + b"\x2a" + _varint(len(summary)) + summary)


def _histogram_value_bytes(tag: str, h: HistogramData | None) -> bytes:
    """Serialized ``Summary.value`` holding a ``HistogramProto`` (what ``add_histogram_raw`` writes),
    built from packed float64 arrays: no protobuf objects, no per-bucket Python work."""
    if h is None:
        return b""
    limits = np.asarray(h.bucket_limits, dtype="<f8").tobytes()
    counts = np.asarray(h.bucket_counts, dtype="<f8").tobytes()
    histo = (struct.pack("<BdBdBdBdBd", 0x09, h.min, 0x11, h.max, 0x19, float(h.num), 0x21, h.sum, 0x29, h.sum_squares)
             + b"\x32" + _varint(len(limits)) + limits + b"\x3a" + _varint(len(counts)) + counts)
    t = tag.encode("utf-8")
    inner = b"\x0a" + _varint(len(t)) + t + b"\x2a" + _varint(len(histo)) + histo
    return b"\x0a" + _varint(len(inner)) + inner


def _encode_scalars(prefixes: np.ndarray, values: np.ndarray) -> bytes:
    """Serialized ``Summary`` entries for the non-NaN ``values`` (float32, as ``simple_value``).

    Building the bytes from cached per-tag prefixes costs ~0.1 us per scalar; creating one
    ``Summary.Value`` object per scalar costs ~10x more, which matters at hundreds of layers.
    """
    keep = ~np.isnan(values)
    floats = values[keep].astype("<f4").tobytes()
    return b"".join([p + floats[4 * i:4 * i + 4] for i, p in enumerate(prefixes[keep].tolist())])


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
            close). Default: the watcher's ``figure_every_n_steps``, else 500. Rendering takes
            0.1-1 s on the training thread (more layers, longer), hence the sparse default.
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
        if isinstance(log_dir, str | os.PathLike):
            from torch.utils.tensorboard import SummaryWriter

            # a deeper queue than the default 10 lets bursts (histograms, figure, text) go by without waiting
            self.writer = SummaryWriter(log_dir=os.fspath(log_dir), flush_secs=flush_secs, max_queue=_MAX_QUEUE)
            self.owns_writer = True
        elif hasattr(log_dir, "add_custom_scalars") and (hasattr(log_dir, "file_writer") or hasattr(log_dir, "_get_file_writer")):
            self.writer = log_dir
            self.owns_writer = False
        else:
            raise TypeError(
                "TensorBoardSink: log_dir must be a directory path or a torch.utils.tensorboard.SummaryWriter "
                f"(tensorboardX's works too), got {type(log_dir).__name__}"
            )
        from gradwatch.checksums import accelerate_writer

        #: whether the writer got the fast record checksum (see :mod:`gradwatch.checksums`)
        self.fast_crc = bool(fast_crc) and accelerate_writer(self.writer)
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
        self._warned: set[str] = set()
        self._table_key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._table_lists: tuple[list[str], list[str], tuple[int, int]] | None = None
        self._total_prefixes: dict[str, bytes] = {}
        self._layer_keys: dict[str, str] = {}
        self._act_keys: list[str] = []
        self._meta_context: dict[str, Any] | None = None
        self._grad_tags: np.ndarray = np.zeros(0, dtype=object)
        self._act_tags: np.ndarray = np.zeros(0, dtype=object)
        self._signal_tags: np.ndarray = np.zeros(0, dtype=object)
        window = getattr(getattr(watcher, "thresholds", None), "window", _DEFAULT_WINDOW)
        self._recent: deque[tuple[int, list[str], np.ndarray]] = deque(maxlen=int(window))
        self._diagnosis: Diagnosis | None = None
        self._text_signature: tuple | None = None
        self._last_step: int | None = None
        self._last_figure_step: int | None = None
        _LIVE.add(self)

    # -- plumbing ----------------------------------------------------------------------------------
    def _failed(self, what: str, exc: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.error("gradwatch: writing %s to TensorBoard failed (%s: %s); training continues and later writes "
                      "are still attempted (this message is shown once)", what, type(exc).__name__, exc)
        else:
            log.debug("gradwatch: writing %s to TensorBoard failed again: %s", what, exc)

    def _file_writer(self) -> Any | None:
        """The writer's event-file writer, or ``None`` once the writer was closed.

        ``SummaryWriter._get_file_writer()`` silently opens a *new* event file after ``close()``;
        a borrowed writer closed by its owner must not be resurrected, so the attribute is read.
        """
        if hasattr(self.writer, "file_writer"):
            return self.writer.file_writer
        getter = getattr(self.writer, "_get_file_writer", None)
        return getter() if callable(getter) else None

    def _writable(self, what: str) -> Any | None:
        fw = self._file_writer()
        if fw is None and "closed" not in self._warned:
            self._warned.add("closed")
            log.warning("gradwatch: the SummaryWriter was closed before gradwatch finished; %s and everything after "
                        "it are not written. Close the watcher before the writer (or the Lightning logger).", what)
        return fw

    def _add_summary(self, values: list[Summary.Value], step: int) -> None:
        if not values:
            return
        fw = self._writable("scalars")
        if fw is None:
            return
        fw.add_summary(Summary(value=values), step)

    # -- tags --------------------------------------------------------------------------------------
    def _total_prefix(self, name: str) -> bytes:
        prefix = self._total_prefixes.get(name)
        if prefix is None:
            prefix = self._total_prefixes[name] = _value_prefix(T.total_tag(name, self.prefix))
        return prefix

    def _update_tables(self, layers: list[str], activations: list[str], step: int) -> None:
        if self._table_lists is not None and self._table_lists[0] is layers and self._table_lists[1] is activations \
                and self._table_lists[2] == (len(layers), len(activations)):
            key = self._table_key  # the watcher passes the same lists until its layers change
        else:
            key = (tuple(layers), tuple(activations))
            self._table_lists = (layers, activations, (len(layers), len(activations)))
        if key == self._table_key:
            context = getattr(getattr(self.watcher, "history", None), "context", None)
            if context is not None and context != self._meta_context:  # e.g. AMP loss scaling noticed later
                self._write_meta(layers, activations, list(self._act_keys), step)
            return
        self._table_key = key
        lw, aw = T.depth_width(len(layers)), T.depth_width(len(activations))
        self._layer_keys = {name: T.layer_key(i, name, lw) for i, name in enumerate(layers)}
        act_keys = self._act_keys = [T.layer_key(i, name, aw) for i, name in enumerate(activations)]
        p = self.prefix

        def prefixes(tags: list[str]) -> np.ndarray:
            return np.array([_value_prefix(t) for t in tags], dtype=object)

        self._grad_tags = prefixes([f"{p}{m}/{self._layer_keys[n]}" for n in layers for m in GRAD_METRICS])
        self._signal_tags = prefixes([f"{p}{m}/{self._layer_keys[n]}" for n in layers for m in LAYER_SIGNAL_METRICS])
        self._act_tags = prefixes([f"{p}{m}/{k}" for k in act_keys for m in ACT_METRICS])
        self._write_meta(layers, activations, act_keys, step)

    def _layer_key(self, name: str, index: int, n: int) -> str:
        key = self._layer_keys.get(name)
        return key if key is not None else T.layer_key(index, name, T.depth_width(n))

    def _write_meta(self, layers: list[str], activations: list[str], act_keys: list[str], step: int) -> None:
        w = self.watcher
        history = getattr(w, "history", None)
        lmeta = getattr(history, "layer_meta", {}) or {}
        ameta = getattr(history, "activation_meta", {}) or {}
        meta: dict[str, Any] = {
            "format": META_FORMAT,
            "prefix": self.prefix,
            "layers": [
                {"name": n, "key": self._layer_keys[n], **({**asdict(lmeta[n]), "depth": i} if n in lmeta else {"depth": i})}
                for i, n in enumerate(layers)
            ],
            "activations": [
                {"name": n, "key": k, **({**asdict(ameta[n]), "depth": i} if n in ameta else {"depth": i})}
                for i, (n, k) in enumerate(zip(activations, act_keys, strict=True))
            ],
        }
        if w is not None:
            meta["name"] = getattr(w, "name", None)
            self._meta_context = dict(getattr(history, "context", {}) or {})
            meta["context"] = {k: _json_safe(v) for k, v in self._meta_context.items()}
            th = getattr(w, "thresholds", None)
            if th is not None:
                meta["thresholds"] = asdict(th)
            for attr in ("every_n_steps", "activation_every_n_steps", "slow_stats_every_n", "histogram_every_n_steps"):
                if hasattr(w, attr):
                    meta[attr] = getattr(w, attr)
        payload = json.dumps(meta).encode("utf-8")
        metadata = SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(plugin_name=T.META_PLUGIN, content=json.dumps({"format": META_FORMAT}).encode()),
            summary_description="gradwatch run metadata (read by `gradwatch report`)",
        )
        tensor = TensorProto(dtype="DT_STRING", string_val=[payload], tensor_shape=TensorShapeProto())
        self._add_summary([Summary.Value(tag=self.prefix + T.META_TAG, tensor=tensor, metadata=metadata)], step)

    def _write_layout(self, activations: bool = True) -> None:
        if not self.layout:
            return
        try:
            if self.writer in _LAYOUT_WRITTEN:
                if _LAYOUT_WRITTEN[self.writer] != self.prefix and "layout" not in self._warned:
                    self._warned.add("layout")
                    log.info("gradwatch: this SummaryWriter already holds a gradwatch layout (prefix %r); "
                             "TensorBoard accepts one layout per writer, so none is added for prefix %r",
                             _LAYOUT_WRITTEN[self.writer], self.prefix)
                return
            _LAYOUT_WRITTEN[self.writer] = self.prefix
        except TypeError:  # a writer that cannot be weakly referenced: write once per sink
            pass
        if self._writable("layout") is not None:
            self.writer.add_custom_scalars(T.layout(self.prefix, activations=activations))

    # -- Sink protocol -----------------------------------------------------------------------------
    def write_step(self, record: StepRecord) -> None:
        """Write one collected step's scalars as a single event (cheap: one proto, no per-tag calls)."""
        if self.closed:
            return
        try:
            first = self._table_key is None
            self._update_tables(record.layers, record.activations, record.step)
            if first:  # no activation modules (functional activations): no forever-empty activation charts
                self._write_layout(activations=bool(record.activations))
            self._write_event(_event_bytes(self._scalar_values(record), record.step, time.time()))
            self._recent.append((record.step, record.layers, record.values))
            self._last_step = record.step
            self.steps_written += 1
        except Exception as exc:
            self._failed("scalars", exc)
            return
        every = self.figure_every_n_steps
        if every and self.steps_written % every == 0:
            self.write_figure(record.step)

    def _scalar_values(self, record: StepRecord) -> bytes:
        """The step's scalars as a serialized ``Summary`` (see :func:`_encode_scalars`)."""
        flat = np.asarray(record.values, dtype=np.float64).reshape(-1)
        if len(flat) != len(self._grad_tags):
            raise ValueError(f"step record has {flat.size} values for {len(self._grad_tags)} tags")
        parts = [_encode_scalars(self._grad_tags, flat)]
        for arr, tags in ((record.act_values, self._act_tags), (record.signal, self._signal_tags)):
            if arr is None:
                continue
            a = np.asarray(arr, dtype=np.float64)
            if a.ndim != 2 or a.size != len(tags):
                continue  # shapes from a newer core than this writer knows
            parts.append(_encode_scalars(tags, a.reshape(-1)))
        totals = {"grad_norm": record.total_norm, "loss": record.loss, **record.extra}
        names = [k for k, v in totals.items() if v is not None and not math.isnan(v)]
        if names:
            prefixes = np.array([self._total_prefix(k) for k in names], dtype=object)
            parts.append(_encode_scalars(prefixes, np.array([float(totals[k]) for k in names])))
        return b"".join(parts)

    def write_histograms(self, step: int, layers: list[LayerInfo]) -> None:
        """Bin every layer's gradients (and optionally weights) on device; write raw histograms.

        All histograms and counts of the step go out as one event, serialized here from packed
        arrays (the same ``HistogramProto`` that ``add_histogram_raw`` writes).
        """
        if self.closed or not self.histograms:
            return
        try:
            if self._writable("histograms") is None:
                return
            grads = [[p.grad for p in layer.params if p.grad is not None] for layer in layers]
            results = bin_on_device(grads)
            weights = bin_on_device([[p.detach() for p in layer.params] for layer in layers]) if self.weight_histograms else None
            p = self.prefix
            parts: list[bytes] = []
            for i, layer in enumerate(layers):
                key = self._layer_key(layer.name, i, len(layers))
                h = results[i]
                if h is not None:
                    parts.append(_histogram_value_bytes(f"{p}{T.GRAD_HIST}/{key}", h.values))
                    parts.append(_histogram_value_bytes(f"{p}{T.LOG10_HIST}/{key}", h.log10_abs))
                    parts += [_value_prefix(f"{p}{name}/{key}") + struct.pack("<f", value)
                              for name, value in zip(T.HIST_COUNTS, (h.zeros, h.nan, h.inf), strict=True)]
                if weights is not None and weights[i] is not None:
                    parts.append(_histogram_value_bytes(f"{p}{T.WEIGHT_HIST}/{key}", weights[i].values))
            if parts:
                self._write_event(_event_bytes(b"".join(parts), step, time.time()))
        except Exception as exc:
            self._failed("histograms", exc)

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
            if self._writable("diagnosis") is not None:
                self.writer.add_text(self.prefix + T.DIAGNOSIS_TAG, diagnosis_markdown(diagnosis, step), global_step=step)
        except Exception as exc:
            self._failed("diagnosis text", exc)

    def write_text(self, tag: str, text: str, step: int) -> None:
        """Free text under ``tag`` (e.g. what auto-fix did), shown in TensorBoard's TEXT tab."""
        if self.closed or not self.text:
            return
        try:
            if self._writable("text") is not None:
                self.writer.add_text(self.prefix + tag, text, global_step=step)
        except Exception as exc:
            self._failed("text", exc)

    def write_figure(self, step: int | None = None) -> None:
        """Render the gradient-flow figure from the recent steps and log it as an image."""
        if step is None:
            step = self._last_step
        if step is None or not self._recent or step == self._last_figure_step:
            return
        try:
            from gradwatch.figure import diagnosis_flags, figure_to_png, gradient_flow_figure, verdict

            layers, mean, mx = self._recent_profile()
            v = verdict(self._diagnosis)
            first = self._recent[0][0]
            span = f"steps {first}-{step}" if first != step else f"step {step}"
            fig = gradient_flow_figure(layers, mean, mx, flags=diagnosis_flags(self._diagnosis),
                                       title=f"gradient flow ({span})" + (f": {v}" if v else ""))
            png = figure_to_png(fig)
            w, h = (int(v) for v in fig.canvas.get_width_height())
            fw = self._writable("figure")
            if fw is None:
                return
            image = Summary.Image(height=h, width=w, colorspace=4, encoded_image_string=png)
            fw.add_summary(Summary(value=[Summary.Value(tag=self.prefix + T.FIGURE_TAG, image=image)]), step)
            self._last_figure_step = step
        except Exception as exc:
            self._failed("figure", exc)

    def _recent_profile(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Per-layer medians of mean|g| and max|g| over the recent steps (layers of the latest step)."""
        layers = self._recent[-1][1]
        index = {n: i for i, n in enumerate(layers)}
        mean = np.full((len(self._recent), len(layers)), np.nan)
        mx = np.full_like(mean, np.nan)
        for t, (_, names, values) in enumerate(self._recent):
            cols = [index.get(n, -1) for n in names]
            for j, c in enumerate(cols):
                if c >= 0:
                    mean[t, c] = values[j, GRAD["grad_mean_abs"]]
                    mx[t, c] = values[j, GRAD["grad_max_abs"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return layers, np.nanmedian(mean, axis=0), np.nanmedian(mx, axis=0)

    def _write_event(self, data: bytes) -> None:
        """Hand one serialized event to the writer: as bytes on its record queue when the writer is
        TensorBoard's own ``EventFileWriter``, else parsed, through the public ``add_event``."""
        fw = self._writable("scalars")
        if fw is None:
            return
        event_writer = getattr(fw, "event_writer", None)
        async_writer = getattr(event_writer, "_async_writer", None)
        if callable(getattr(async_writer, "write", None)) and type(event_writer).__name__ == "EventFileWriter":
            async_writer.write(data)
            return
        from tensorboard.compat.proto.event_pb2 import Event

        event = Event.FromString(data)
        fw.add_event(event, event.step, event.wall_time)

    def flush(self) -> None:
        """Push the writer's queued events to disk."""
        try:
            if self._file_writer() is not None:
                self.writer.flush()
        except Exception as exc:
            self._failed("flush", exc)

    def close(self) -> None:
        """Log the final figure, flush, and close the writer if this sink created it. Idempotent."""
        if self.closed:
            return
        self.write_figure()
        self.flush()
        self.closed = True
        _LIVE.discard(self)
        if self.owns_writer:
            try:
                self.writer.close()
            except Exception as exc:
                self._failed("close", exc)

    def _at_exit(self) -> None:
        """Interpreter exit without ``close()``: the source's buffered steps are recorded, then the writer
        flushed (no figure: matplotlib may be gone)."""
        if self.closed:
            return
        if self.watcher is not None:
            try:
                self.watcher.record_pending()
            except Exception as exc:
                self._failed("pending steps", exc)
        self.flush()
        self.closed = True
        if self.owns_writer:
            try:
                self.writer.close()
            except Exception:
                pass

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
