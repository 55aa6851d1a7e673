"""Read gradwatch's TensorBoard event files back: runs, a long-format history, an offline diagnosis.

Events are read with TensorBoard's own record reader (``event_file_loader``, the loader under
``EventAccumulator`` and the TensorBoard server), one pass per file. Before that, a cheap walk over
the record headers checks each file's framing, so that a problem is *reported* instead of silently
ending the read (TensorBoard stops at the first bad record without a word):

- a file that is not an event file at all (foreign, empty) is skipped with a note;
- a truncated file (the run was killed mid-write) is read up to its last complete record;
- a corrupted record ends the read of its file; the note says how many records were lost.

Tags map back to layers through :mod:`gradwatch.tags` and the run's logged metadata, so the frame
has the same shape as ``GradWatcher.to_dataframe()`` (``step, layer, metric, value, depth``) and
:meth:`RunLog.diagnose` runs the same rules, with the same thresholds and window, as the live
watcher did.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradwatch import tags as T
from gradwatch.findings import Diagnosis
from gradwatch.history import ActivationMeta, HistoryView, LayerMeta
from gradwatch.metrics import ACT_METRICS
from gradwatch.thresholds import Thresholds

log = logging.getLogger("gradwatch")

_EVENT_MARK = "tfevents"
_HEADER = struct.Struct("<Q")


@dataclass
class FileCheck:
    """The framing check of one event file: how many complete records it holds, and what is wrong."""

    path: Path
    records: int = 0
    problem: str | None = None
    readable: bool = True   # False: not an event file at all (skipped)


@dataclass
class RunLog:
    """Everything gradwatch wrote to one run directory.

    Attributes:
        name: the run's path relative to the log directory (``"."`` for the directory itself).
        path: the run directory.
        frame: long-format history (``step, layer, metric, value, depth``); global series use the
            layer ``"(total)"``; sorted by step, layer depth, metric.
        meta: the run's logged metadata (layers, activations, thresholds, cadences); ``{}`` if absent.
        texts: ``(step, markdown)`` of the diagnosis texts written during the run.
        histogram_tags: tags of the histograms found.
        image_steps: steps at which the gradient-flow figure was logged.
        problems: one readable sentence per file that could not be read completely.
        files: the event files read.
    """

    name: str
    path: Path
    frame: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    texts: list[tuple[int, str]] = field(default_factory=list)
    histogram_tags: list[str] = field(default_factory=list)
    image_steps: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def has_gradwatch_data(self) -> bool:
        """Whether any gradwatch scalar was found (other tools' events do not count)."""
        return bool(len(self.frame))

    def thresholds(self) -> Thresholds:
        """The thresholds the live run used (logged), else the defaults."""
        saved = self.meta.get("thresholds") or {}
        known = {f.name for f in fields(Thresholds)}
        try:
            return Thresholds(**{k: v for k, v in saved.items() if k in known})
        except (TypeError, ValueError) as exc:
            log.warning("gradwatch: %s: logged thresholds are invalid (%s); using the defaults", self.name, exc)
            return Thresholds()

    def layer_meta(self) -> dict[str, LayerMeta]:
        return {d["name"]: _from_dict(LayerMeta, d) for d in self.meta.get("layers", [])}

    def activation_meta(self) -> dict[str, ActivationMeta]:
        return {d["name"]: _from_dict(ActivationMeta, d) for d in self.meta.get("activations", [])}

    def history_view(self, thresholds: Thresholds | None = None) -> HistoryView:
        """The window the live watcher's ``diagnose()`` would look at: the last ``thresholds.window``
        collected steps and the matching number of activation samples (first non-finite step and
        step counts over the whole run)."""
        th = thresholds or self.thresholds()
        frame = self.frame
        lmeta, ameta = self.layer_meta(), self.activation_meta()
        if lmeta:  # like the live diagnosis: only the layers of the model as it was last logged
            keep = (frame["layer"] == T.TOTAL_LAYER) | (frame["metric"].isin(ACT_METRICS) & frame["layer"].isin(ameta)) | (
                ~frame["metric"].isin(ACT_METRICS) & frame["layer"].isin(lmeta))
            frame = frame[keep]
        view = HistoryView.from_dataframe(
            frame, context=self.meta.get("context") or {},
            layer_meta=lmeta or None, activation_meta=ameta or None,
        )
        every = max(1, int(self.meta.get("activation_every_n_steps") or 1))
        return window(view, th.window, max(3, th.window // every + 1), th.spike_lookback)

    def diagnose(self, thresholds: Thresholds | None = None) -> Diagnosis:
        """Run the diagnosis offline, exactly as the live watcher's ``diagnose()`` does."""
        from gradwatch.diagnose import diagnose

        th = thresholds or self.thresholds()
        return diagnose(self.history_view(th), th)


def window(view: HistoryView, last: int, last_samples: int, lookback: int = 0) -> HistoryView:
    """The most recent ``last`` steps and ``last_samples`` activation samples of a view, as
    ``History.view(last, last_samples, lookback=lookback)`` selects them (samples from inside the step
    window only; up to ``lookback`` earlier steps as the ``pre_*`` baseline)."""
    from dataclasses import replace

    steps = view.steps[-last:]
    keep = np.zeros(len(view.sample_steps), dtype=bool)
    if last_samples > 0:
        keep[-last_samples:] = True
    if len(steps):
        keep &= view.sample_steps >= steps[0]
    pre = slice(max(0, len(view.steps) - last - lookback), max(0, len(view.steps) - last))
    return replace(
        view,
        pre_steps=view.steps[pre], pre_grad_norm=view.metric("grad_norm")[pre], pre_total_norm=view.total_norm[pre],
        pre_loss=view.loss[pre],
        steps=steps, grad=view.grad[-last:], total_norm=view.total_norm[-last:], loss=view.loss[-last:],
        sample_steps=view.sample_steps[keep], act=view.act[keep], signal=view.signal[keep],
    )


_META_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "layers": {"name": (str,), "key": (str,), "type_name": (str,), "depth": (int,), "fan_in": (int, type(None)),
               "numel": (int,), "recurrent": (bool,)},
    "activations": {"name": (str,), "key": (str,), "kind": (str,), "type_name": (str,), "depth": (int,),
                    "feeding_layer": (str, type(None)), "is_output": (bool,)},
}
_META_INTS = ("every_n_steps", "activation_every_n_steps", "slow_stats_every_n", "histogram_every_n_steps")


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with a run's logged metadata (it comes from a file: anything can be there), or ``None``."""
    if not isinstance(meta, dict):
        return f"a {type(meta).__name__}, not an object"
    for key, spec in _META_FIELDS.items():
        items = meta.get(key, [])
        if not isinstance(items, list):
            return f"{key!r} is a {type(items).__name__}, not a list"
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return f"{key}[{i}] has no name"
            for field_name, types in spec.items():
                value = item.get(field_name)
                if field_name in item and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
                    return f"{key}[{i}].{field_name}={value!r}"
    for key in _META_INTS:
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"{key}={value!r}"
    for key, types in (("prefix", (str,)), ("context", (dict,)), ("thresholds", (dict,)), ("name", (str,))):
        if meta.get(key) is not None and not isinstance(meta[key], types):
            return f"{key}={meta[key]!r}"
    return None


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


# -- files -------------------------------------------------------------------------------------------
def is_event_file(path: str | os.PathLike[str]) -> bool:
    return _EVENT_MARK in Path(path).name


def find_runs(logdir: str | os.PathLike[str]) -> list[Path]:
    """Directories under ``logdir`` (itself included) that hold event files, sorted.

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
    """
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if root.is_file():
        return [root.parent] if is_event_file(root) else []
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(is_event_file(f) for f in filenames):
            runs.append(Path(dirpath))
    return runs


def check_event_file(path: str | os.PathLike[str]) -> FileCheck:
    """Walk the record headers of one event file (cheap: 12 bytes read per record).

    A TFRecord is ``length (8 bytes) | masked crc32c(length) (4) | data (length) | crc32c(data) (4)``.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    p = Path(path)
    check = FileCheck(p)
    try:
        size = p.stat().st_size
        if size == 0:
            check.problem, check.readable = "empty file (the writer was created but nothing was flushed)", False
            return check
        with open(p, "rb") as fh:
            offset = 0
            while offset < size:
                header = fh.read(12)
                if len(header) < 12:
                    check.problem = _truncated(check.records, size - offset)
                    break
                (length,) = _HEADER.unpack(header[:8])
                if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
                    if check.records == 0:
                        check.problem, check.readable = "not a TensorBoard event file (its first record header is invalid)", False
                    else:
                        check.problem = (f"corrupted record header at byte {offset} after {check.records} good records; "
                                         "TensorBoard stops reading this file there, later records are lost")
                    break
                if offset + 12 + length + 4 > size:
                    check.problem = _truncated(check.records, size - offset)
                    break
                offset += 12 + length + 4
                fh.seek(offset)
                check.records += 1
    except OSError as exc:
        check.problem, check.readable = f"cannot be read: {exc.strerror or exc}", False
    return check


def _truncated(records: int, tail: int) -> str:
    return (f"truncated: the last record is incomplete ({tail} bytes after {records} complete records), as when a run is "
            "killed while writing; everything before it is read")


# -- reading ------------------------------------------------------------------------------------------
class _Collector:
    """Accumulates the events of one run (all its files, in order)."""

    def __init__(self) -> None:
        self.scalars: dict[str, dict[int, float]] = {}
        self.metas: list[tuple[int, float, dict[str, Any]]] = []
        self.texts: list[tuple[int, str]] = []
        self.histograms: set[str] = set()
        self.images: list[int] = []
        self.unreadable_metas = 0

    def add(self, event: Any) -> None:
        if not event.HasField("summary"):
            return
        step = int(event.step)
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                self.scalars.setdefault(value.tag, {})[step] = float(value.simple_value)
            elif kind == "histo":
                self.histograms.add(value.tag)
            elif kind == "image":
                if value.tag.endswith(T.FIGURE_TAG):
                    self.images.append(step)
            elif kind == "tensor":
                self._tensor(value, step, event.wall_time)

    def _tensor(self, value: Any, step: int, wall_time: float) -> None:
        plugin = value.metadata.plugin_data.plugin_name if value.HasField("metadata") else ""
        strings = list(value.tensor.string_val)
        if value.tag.endswith(T.META_TAG) and strings:
            try:
                self.metas.append((step, wall_time, json.loads(strings[0].decode("utf-8"))))
            except (ValueError, UnicodeDecodeError):
                self.unreadable_metas += 1
        elif value.tag.endswith(T.DIAGNOSIS_TAG + "/text_summary") and strings:
            self.texts.append((step, strings[0].decode("utf-8", "replace")))
        elif plugin == "scalars" and value.tensor.float_val:  # new-style scalar summaries
            self.scalars.setdefault(value.tag, {})[step] = float(value.tensor.float_val[0])


def read_run(path: str | os.PathLike[str], name: str | None = None) -> RunLog:
    """Read one run directory (all its event files, oldest first). Never raises on bad files:
    what could not be read is described in ``RunLog.problems``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    run_dir = Path(path)
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir} does not exist")
    files = sorted(f for f in run_dir.iterdir() if f.is_file() and is_event_file(f)) if run_dir.is_dir() else [run_dir]
    collector = _Collector()
    problems: list[str] = []
    read: list[Path] = []
    for f in files:
        check = check_event_file(f)
        if not check.readable:
            problems.append(f"{f.name}: skipped, {check.problem}")
            continue
        count = 0
        try:
            for event in LegacyEventFileLoader(str(f)).Load():
                count += 1
                collector.add(event)
        except Exception as exc:  # a reader failure must become a note, never a traceback
            problems.append(f"{f.name}: reading stopped after {count} records ({type(exc).__name__}: {exc})")
            read.append(f)
            continue
        read.append(f)
        if check.problem:
            problems.append(f"{f.name}: {check.problem}")
        elif count < check.records:
            problems.append(f"{f.name}: corrupted record (checksum mismatch) after {count} good records; TensorBoard stops "
                            f"reading this file there, so the {check.records - count} later records are lost")
    if collector.unreadable_metas:
        problems.append(f"{collector.unreadable_metas} gradwatch metadata record(s) are not valid UTF-8 JSON; ignored")
    meta = collector.metas[-1][2] if collector.metas else {}
    malformed = _meta_problem(meta)
    if malformed:  # written by something else, or damaged: read the scalars without it
        problems.append(f"the run's gradwatch metadata is malformed ({malformed}); read without it, so layer types, "
                        "depths and thresholds are unknown")
        meta = {}
    frame = _frame(collector.scalars, meta)
    return RunLog(
        name=name if name is not None else run_dir.name,
        path=run_dir,
        frame=frame,
        meta=meta,
        texts=sorted(collector.texts),
        histogram_tags=sorted(collector.histograms),
        image_steps=sorted(set(collector.images)),
        problems=problems,
        files=read,
    )


def read_logdir(logdir: str | os.PathLike[str]) -> list[RunLog]:
    """Read every run under ``logdir`` (each directory holding event files is a run).

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
    """
    root = Path(logdir)
    runs = find_runs(root)
    base = root if root.is_dir() else root.parent
    return [read_run(run, name=os.path.relpath(run, base)) for run in runs]


def _detect_prefix(tags: list[str]) -> str:
    suffix = T.total_tag("grad_norm")
    hits = sorted({t[: -len(suffix)] for t in tags if t.endswith(suffix)}, key=len)
    return hits[0] if hits else ""


def _frame(scalars: dict[str, dict[int, float]], meta: dict[str, Any]) -> pd.DataFrame:
    """Long-format frame of gradwatch's scalars; other tags are ignored."""
    prefix = meta.get("prefix") if meta else None
    if prefix is None:
        prefix = _detect_prefix(list(scalars))
    layer_depth = {d["name"]: i for i, d in enumerate(meta.get("layers", []))}
    n_layers = len(layer_depth)
    act_depth = {d["name"]: i for i, d in enumerate(meta.get("activations", []))}
    parsed = {tag: T.parse_tag(tag, prefix) for tag in scalars}
    parsed = {tag: p for tag, p in parsed.items() if p is not None}
    if not any(p.layer == T.TOTAL_LAYER and p.metric == "grad_norm" for p in parsed.values()) and not meta:
        return _empty_frame()
    if not n_layers:
        n_layers = len({p.layer for p in parsed.values() if p.layer != T.TOTAL_LAYER and p.metric not in ACT_METRICS})
    # one frame built from flat columns: a frame per tag costs ~0.5 ms each (minutes at thousands of layers)
    steps, values, layers, metrics, depths, counts = [], [], [], [], [], []
    for tag, p in parsed.items():
        series = scalars[tag]
        if p.layer == T.TOTAL_LAYER:
            depth = -1
        elif p.metric in ACT_METRICS:
            depth = n_layers + act_depth.get(p.layer, p.depth if p.depth is not None else 0)
        else:
            depth = layer_depth.get(p.layer, p.depth if p.depth is not None else 0)
        steps.append(np.fromiter(series.keys(), dtype=np.int64, count=len(series)))
        values.append(np.fromiter(series.values(), dtype=np.float64, count=len(series)))
        layers.append(p.layer)
        metrics.append(p.metric)
        depths.append(depth)
        counts.append(len(series))
    if not steps:
        return _empty_frame()
    n = np.array(counts, dtype=np.int64)
    df = pd.DataFrame({
        "step": np.concatenate(steps), "layer": np.repeat(np.array(layers, dtype=object), n),
        "metric": np.repeat(np.array(metrics, dtype=object), n), "value": np.concatenate(values),
        "depth": np.repeat(np.array(depths, dtype=np.int64), n),
    })
    df = df[~df["value"].isna()]
    return df.sort_values(["step", "depth", "metric"], kind="stable").reset_index(drop=True)


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({"step": pd.Series(dtype="int64"), "layer": pd.Series(dtype="object"),
                         "metric": pd.Series(dtype="object"), "value": pd.Series(dtype="float64"),
                         "depth": pd.Series(dtype="int64")})


def describe_steps(run: RunLog) -> str:
    """``"steps 0-59 (60 collected)"`` for a run's gradient series."""
    steps = run.frame.loc[run.frame["metric"] == "grad_norm", "step"]
    if not len(steps):
        return "no steps"
    return f"steps {int(steps.min())}-{int(steps.max())} ({steps.nunique()} collected)"


__all__ = ["FileCheck", "RunLog", "check_event_file", "describe_steps", "find_runs", "read_logdir", "read_run", "window"]
