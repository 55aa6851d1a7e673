"""TensorBoard record checksums computed by google-crc32c (C) instead of TensorBoard's Python loop.

Every record TensorBoard writes carries a masked CRC-32C of its bytes. Without TensorFlow installed,
``tensorboard.summary.writer.record_writer`` computes it in pure Python, one byte at a time
(~0.4 us a byte): a deep model's step of per-layer scalars (tens of KB) costs milliseconds and a
histogram step (~100 KB) tens of milliseconds of CPU in the writer's thread, holding the GIL.
:func:`accelerate_writer` gives one ``SummaryWriter``'s record writer the same checksum from the
maintained ``google-crc32c`` package (hardware CRC instructions where the CPU has them); the files
are byte-for-byte the same and every other writer in the process keeps TensorBoard's implementation.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Any

import google_crc32c

log = logging.getLogger("gradwatch")

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """The masked CRC-32C of TFRecord framing (same result as TensorBoard's ``masked_crc32c``)."""
    x = google_crc32c.value(bytes(data))
    return (((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _record_write(file: Any) -> Any:
    """``RecordWriter.write`` (TFRecord framing: length, its checksum, data, its checksum) to ``file``."""

    def write(data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        file.write(header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data)))

    return write


def accelerate_writer(writer: Any) -> bool:
    """Give one ``SummaryWriter`` (torch's) the C checksum; returns whether it has it.

    Sets ``write`` on that writer's own ``RecordWriter`` instance (reached through
    ``file_writer.event_writer._async_writer._writer``); the class, and every other writer, is
    untouched. Nothing changes when google-crc32c has no compiled implementation on this platform
    (its pure-Python fallback is no faster), when the writer is not laid out as this TensorBoard
    version's, or when the two checksums disagree on a sample.
    """
    if google_crc32c.implementation != "c":
        return False
    try:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference
        from tensorboard.summary.writer.record_writer import RecordWriter

        record_writer = writer.file_writer.event_writer._async_writer._writer
        if getattr(record_writer, "_gradwatch_fast_crc", False):
            return True
        if type(record_writer) is not RecordWriter or not hasattr(record_writer, "_writer"):
            return False
        sample = os.urandom(1000)
        if masked_crc32c(sample) != reference(sample) or masked_crc32c(sample[:7]) != reference(sample[:7]):
            log.warning("gradwatch: google-crc32c disagrees with TensorBoard's CRC-32C; keeping TensorBoard's writer")
            return False
        record_writer.write = _record_write(record_writer._writer)
        record_writer._gradwatch_fast_crc = True
        return True
    except Exception as exc:  # any other layout: keep the writer as it is
        log.debug("gradwatch: could not give the TensorBoard writer the C checksum (%s)", exc)
        return False


__all__ = ["accelerate_writer", "masked_crc32c"]
