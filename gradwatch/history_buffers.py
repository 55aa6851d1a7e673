"""The bounded buffers behind the history: a ring of recent records and a long-term block summary.

Both are allocated up front and never grow with the run (only with new layers): the memory bound
documented in :mod:`gradwatch.history`.
"""

from __future__ import annotations

import numpy as np


class RingBuffer:
    """Fixed-capacity ring of equally shaped float32 records with their step numbers."""

    def __init__(self, capacity: int, shape: tuple[int, ...]):
        self.capacity = capacity
        self.data = np.full((capacity, *shape), np.nan, dtype=np.float32)
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.count = 0  # total appended

    def append(self, step: int, record: np.ndarray) -> None:
        i = self.count % self.capacity
        if record.shape[0] != self.data.shape[1]:  # a shorter record: NaN in the columns it lacks
            self.data[i] = np.nan
        self.data[i, : record.shape[0], ...] = record
        self.steps[i] = step
        self.count += 1

    def extend(self, steps: np.ndarray, records: np.ndarray) -> None:
        """``append`` for several records of full width at once (one or two slice assignments)."""
        k = len(records)
        if k > self.capacity:
            steps, records = steps[-self.capacity:], records[-self.capacity:]
            self.count += k - self.capacity
            k = self.capacity
        i = self.count % self.capacity
        first = min(k, self.capacity - i)
        self.data[i:i + first] = records[:first]
        self.steps[i:i + first] = steps[:first]
        if first < k:  # wraps around
            self.data[: k - first] = records[first:]
            self.steps[: k - first] = steps[first:]
        self.count += k

    def grow(self, axis1: int) -> None:
        """Add columns along the first record axis (new layers), filled with NaN."""
        extra = axis1 - self.data.shape[1]
        if extra > 0:
            pad = np.full((self.capacity, extra, *self.data.shape[2:]), np.nan, dtype=np.float32)
            self.data = np.concatenate([self.data, pad], axis=1)

    def ordered(self, last: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.count, self.capacity)
        if last is not None:
            n = min(n, last)
        idx = (np.arange(self.count - n, self.count) % self.capacity) if n else np.zeros(0, dtype=np.int64)
        return self.steps[idx], self.data[idx]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.steps.nbytes


class BlockSummary:
    """Long-term means over blocks of steps; merges pairs of blocks when full (bounded slots)."""

    def __init__(self, slots: int, shape: tuple[int, ...]):
        self.slots = max(2, slots - slots % 2)
        self.sums = np.zeros((self.slots, *shape), dtype=np.float64)
        self.counts = np.zeros((self.slots, *shape), dtype=np.float64)
        self.first = np.zeros(self.slots, dtype=np.int64)
        self.last = np.zeros(self.slots, dtype=np.int64)
        self.filled = 0
        self.block = 1
        self._in_block = 0

    def add(self, step: int, record: np.ndarray) -> None:
        if self._in_block == 0:
            if self.filled == self.slots:
                self._merge()
            i = self.filled
            self.sums[i] = 0
            self.counts[i] = 0
            self.first[i] = step
            self.filled += 1
        i = self.filled - 1
        finite = np.isfinite(record)
        k = record.shape[0]
        self.sums[i, :k] += np.where(finite, record, np.float32(0))  # float32 where, float64 sum
        self.counts[i, :k] += finite
        self.last[i] = step
        self._in_block = (self._in_block + 1) % self.block

    def _merge(self) -> None:
        half = self.slots // 2
        # pair by pair, in place: whole-array sums would allocate temporaries as large as the
        # summary itself (which the allocator keeps: resident memory beyond the documented bound)
        for j in range(half):
            np.add(self.sums[2 * j], self.sums[2 * j + 1], out=self.sums[j])
            np.add(self.counts[2 * j], self.counts[2 * j + 1], out=self.counts[j])
        self.first[:half] = self.first[0::2]
        self.last[:half] = self.last[1::2]
        self.filled = half
        self.block *= 2

    def grow(self, axis1: int) -> None:
        extra = axis1 - self.sums.shape[1]
        if extra > 0:
            pad = np.zeros((self.slots, extra, *self.sums.shape[2:]))
            self.sums = np.concatenate([self.sums, pad], axis=1)
            self.counts = np.concatenate([self.counts, pad.copy()], axis=1)

    def means(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.filled
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.counts[:n] > 0, self.sums[:n] / np.maximum(self.counts[:n], 1), np.nan)
        return self.first[:n], self.last[:n], mean

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes + self.counts.nbytes + self.first.nbytes + self.last.nbytes
