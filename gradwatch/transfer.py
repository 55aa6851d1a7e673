"""Device-to-host copies of a collected step's statistics: blocking (CPU) or delayed (accelerators).

On CPU the statistics already live in host memory, so a step's values are read at once. On an
accelerator a blocking ``.cpu()`` would make the host wait for the device every training step
(it could no longer queue the next kernels while the device works). There a collected step instead
launches a ``non_blocking`` copy into a pinned host buffer (reused, one per step in flight), records
an event after it and returns; the values are consumed once the event has completed -- checked
without waiting at the next step (``ready``), or waited for when someone reads the results
(``drain``: history, diagnosis, close, interpreter exit). Nothing is ever dropped: a copy in flight
stays queued until it is consumed, and at most ``max_in_flight`` are kept (the oldest is waited for
beyond that: bounded memory).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

#: the hot-path implementations: "host" reads values at once (CPU tensors), "accelerator" launches
#: delayed copies and never waits for the device on a common step
HOT_PATHS = ("auto", "host", "accelerator")


def resolve_hot_path(hot_path: str, device: torch.device) -> str:
    """``"auto"`` -> ``"host"`` for CPU tensors, ``"accelerator"`` for any other device."""
    if hot_path not in HOT_PATHS:
        raise ValueError(f"hot_path must be one of {HOT_PATHS}, got {hot_path!r}")
    if hot_path == "auto":
        return "host" if device.type == "cpu" else "accelerator"
    return hot_path


def _event(device: torch.device) -> Any:
    """An event recorded on ``device``'s current stream after the copy (``None`` on CPU: done already)."""
    if device.type == "cpu":
        return None
    event = torch.cuda.Event() if device.type == "cuda" else torch.Event(device=device)
    event.record()
    return event


class HostTransfer:
    """Copies of per-step device tensors into host memory, consumed in launch order.

    Args:
        delayed: launch ``non_blocking`` copies and consume them when ready (accelerators);
            ``False``: a blocking copy, consumed at once.
        max_in_flight: delayed steps kept before the oldest is waited for.
    """

    def __init__(self, delayed: bool, max_in_flight: int = 8):
        self.delayed = delayed
        self.max_in_flight = max_in_flight
        self._queue: deque[tuple[torch.Tensor, Any, Any]] = deque()  # (host buffer, event, payload)
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def _buffer(self, src: torch.Tensor) -> torch.Tensor:
        free = self._free.get((src.numel(), src.dtype))
        if free:
            return free.pop()
        pin = src.device.type != "cpu" and torch.cuda.is_available()  # pinned memory needs an accelerator runtime
        return torch.empty(src.numel(), dtype=src.dtype, pin_memory=pin)

    def launch(self, src: torch.Tensor, payload: Any) -> None:
        """Start copying the flat tensor ``src`` to the host; ``payload`` travels with it."""
        if not self.delayed:
            self._queue.append((src.cpu(), None, payload))
            return
        buf = self._buffer(src)
        buf.copy_(src, non_blocking=True)
        self._queue.append((buf, _event(src.device), payload))

    def discard(self) -> None:
        """Drop every launched copy without consuming it (waiting for those still in flight)."""
        while self._queue:
            buf, event, _ = self._queue.popleft()
            if event is not None:
                event.synchronize()
            if self.delayed:
                self._free.setdefault((buf.numel(), buf.dtype), []).append(buf)

    def consume(self, fn: Callable[[torch.Tensor, Any], None], wait: bool = False) -> None:
        """Call ``fn(host, payload)`` for each launched copy that is complete, oldest first; with
        ``wait`` (or beyond ``max_in_flight``) wait for the copies still in flight. ``host`` is only
        valid during the call (its buffer is reused)."""
        while self._queue:
            buf, event, payload = self._queue[0]
            if event is not None and not event.query():
                if not (wait or len(self._queue) > self.max_in_flight):
                    return
                event.synchronize()
            self._queue.popleft()
            try:
                fn(buf, payload)
            finally:
                if self.delayed:
                    self._free.setdefault((buf.numel(), buf.dtype), []).append(buf)
