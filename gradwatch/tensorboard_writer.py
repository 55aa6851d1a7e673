"""The sink's side of a ``SummaryWriter``: writes that never raise into training, and never reopen a
writer its owner closed."""

from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING, Any

from tensorboard.compat.proto.summary_pb2 import Summary

from gradwatch import tags as T
from gradwatch.checksums import accelerate_writer

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("gradwatch")

#: a deeper queue than the default 10 lets bursts (histograms, figure, text) go by without waiting
_MAX_QUEUE = 64
# writers that already hold a gradwatch layout (add_custom_scalars may be called once per writer)
_LAYOUT_WRITTEN: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


class EventWriter:
    """Writes events through a ``SummaryWriter``, created here or borrowed.

    Args:
        log_dir: a directory (a ``SummaryWriter`` is created there and closed by :meth:`close`) or an
            existing writer (``torch.utils.tensorboard``'s or tensorboardX's): written to, never closed.
        flush_secs: for a writer created here, how often pending events reach the disk.
        fast_crc: compute that writer's record checksums in C (see :mod:`gradwatch.checksums`).

    Raises:
        TypeError: ``log_dir`` is neither a path nor a writer.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | SummaryWriter, flush_secs: float, fast_crc: bool):
        if isinstance(log_dir, str | os.PathLike):
            from torch.utils.tensorboard import SummaryWriter

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
        #: whether the writer got the fast record checksum
        self.fast_crc = bool(fast_crc) and accelerate_writer(self.writer)
        self._warned: set[str] = set()

    def failed(self, what: str, exc: BaseException) -> None:
        """Report a failed write: an error the first time for ``what``, debug output afterwards."""
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

    def writable(self, what: str) -> Any | None:
        """The event-file writer, or ``None`` (with a warning, once) when the writer was closed."""
        fw = self._file_writer()
        if fw is None and "closed" not in self._warned:
            self._warned.add("closed")
            log.warning("gradwatch: the SummaryWriter was closed before gradwatch finished; %s and everything after "
                        "it are not written. Close the watcher before the writer (or the Lightning logger).", what)
        return fw

    def add_summary(self, values: list[Summary.Value], step: int, what: str = "scalars") -> bool:
        """Write ``values`` as one event at ``step``; whether it was written (not when empty or closed)."""
        if not values:
            return False
        fw = self.writable(what)
        if fw is None:
            return False
        fw.add_summary(Summary(value=values), step)
        return True

    def write_event(self, data: bytes) -> None:
        """Hand one serialized event to the writer: as bytes on its record queue when the writer is
        TensorBoard's own ``EventFileWriter``, else parsed, through the public ``add_event``."""
        fw = self.writable("scalars")
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

    def add_text(self, tag: str, text: str, step: int, what: str) -> None:
        """Text under ``tag`` (TensorBoard's TEXT tab)."""
        if self.writable(what) is not None:
            self.writer.add_text(tag, text, global_step=step)

    def add_layout(self, prefix: str, activations: bool) -> None:
        """The custom-scalars dashboard for tags under ``prefix``, unless the writer already holds one
        (TensorBoard accepts one layout per writer)."""
        try:
            if self.writer in _LAYOUT_WRITTEN:
                if _LAYOUT_WRITTEN[self.writer] != prefix and "layout" not in self._warned:
                    self._warned.add("layout")
                    log.info("gradwatch: this SummaryWriter already holds a gradwatch layout (prefix %r); "
                             "TensorBoard accepts one layout per writer, so none is added for prefix %r",
                             _LAYOUT_WRITTEN[self.writer], prefix)
                return
            _LAYOUT_WRITTEN[self.writer] = prefix
        except TypeError:  # a writer that cannot be weakly referenced: write once per sink
            pass
        if self.writable("layout") is not None:
            self.writer.add_custom_scalars(T.layout(prefix, activations=activations))

    def flush(self) -> None:
        """Push the writer's queued events to disk."""
        try:
            if self._file_writer() is not None:
                self.writer.flush()
        except Exception as exc:
            self.failed("flush", exc)

    def close(self, report: bool = True) -> None:
        """Close the writer if it was created here (failures reported unless ``report`` is false)."""
        if not self.owns_writer:
            return
        try:
            self.writer.close()
        except Exception as exc:
            if report:
                self.failed("close", exc)
