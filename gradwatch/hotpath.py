"""One collected step's way to the host: pack the statistics into one copy, read them back by name.

A collected step computes per-device statistic rows (:meth:`GradientCollector.compute_on_device`),
optionally an activation sample and the loss as a tensor. All of it is packed into **one** flat
tensor on the first device (:func:`pack_step`) so that one host copy carries the step;
:class:`HostPipeline` launches that copy (blocking on CPU, delayed on accelerators: see
:mod:`gradwatch.transfer`) together with a :class:`StepLaunch` saying how it was packed and what
recording the step needs besides the copy, and hands each completed copy back, unpacked by
:func:`read_host_row` into a :class:`HostRow` (statistics, loss, sample), in launch order. The
watcher decides what to collect and where the results go; this module only moves them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from gradwatch.collect import GradientCollector, Launched, StepStats
from gradwatch.transfer import HostTransfer


class DeviceRows(NamedTuple):
    """One device's statistic rows of a step, as the collector computed them."""

    device: torch.device
    rows: torch.Tensor         # (layers on this device, metrics), not copied yet
    positions: list[int]       # the collector's parameter positions these rows cover


@dataclass
class StepLaunch:
    """A collected step whose host copy was launched: how the copy is laid out and what recording the
    step needs besides it."""

    step: int
    slow: bool                 # slow statistics were measured
    layouts: list[tuple[tuple[int, ...], torch.dtype]]  # per device: the statistic rows' shape and dtype
    sample_size: int           # elements of the activation sample after the rows (0: none)
    loss: float | None         # None: the loss is the copy's last element
    state: Launched | None     # the collector's state at launch (delayed copies), None: read at once
    keep_out: bool             # a histogram step: recorded on its own, not buffered
    diagnosing: bool           # diagnose once recorded
    scale_in_copy: bool = False  # the AMP loss scale is the copy's last element


@dataclass
class PackedStep:
    """The flat tensor to copy to the host, and how it was packed."""

    flat: torch.Tensor
    layouts: list[tuple[tuple[int, ...], torch.dtype]]
    sample_size: int
    loss: float | None         # None: the loss tensor is in ``flat``, after the sample
    scale_in_copy: bool = False  # a loss-scale tensor is the last element of ``flat``


@dataclass
class HostRow:
    """A launched step read back on the host."""

    stats: StepStats
    loss: float                # NaN when no loss was given
    sample: torch.Tensor | None  # the activation sample (its own memory: the copy's buffer is reused)
    loss_scale: float | None = None  # the AMP loss scale that rode along, if any


def device_rows(partials: list[tuple[torch.device, torch.Tensor, list[int]]]) -> list[DeviceRows]:
    """Name the fields of :meth:`GradientCollector.compute_on_device`'s per-device tuples."""
    return [DeviceRows(*p) for p in partials]


def _moved(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device`` (another accelerator's: a copy that does not wait) in ``dtype``."""
    if t.device != device:
        t = t.to(device, non_blocking=True)
    return t.to(dtype)


def pack_step(partials: list[DeviceRows], sample: torch.Tensor | None, loss: Any,
              loss_scale: torch.Tensor | None = None) -> PackedStep:
    """Every device's rows (gathered on the first device, in the widest dtype among them), then the
    activation sample, then a loss given as a tensor, then a ``GradScaler``'s scale tensor: one
    tensor, one host copy, no device sync."""
    device = partials[0].device
    wide = torch.float64 if any(p.rows.dtype == torch.float64 for p in partials) else partials[0].rows.dtype
    parts = [_moved(p.rows.reshape(-1), device, wide) for p in partials]
    if sample is not None:
        parts.append(sample.to(wide))
    in_copy = isinstance(loss, torch.Tensor)
    if in_copy:
        parts.append(_moved(loss.detach().reshape(-1)[:1], device, wide))
    if loss_scale is not None:
        parts.append(_moved(loss_scale.detach().reshape(-1)[:1], device, wide))
    return PackedStep(
        flat=torch.cat(parts) if len(parts) > 1 else parts[0],
        layouts=[(tuple(p.rows.shape), p.rows.dtype) for p in partials],
        sample_size=0 if sample is None else sample.numel(),
        loss=None if in_copy else (float(loss) if isinstance(loss, int | float) else math.nan),
        scale_in_copy=loss_scale is not None,
    )


def read_host_row(host: torch.Tensor, launch: StepLaunch, collector: GradientCollector) -> HostRow:
    """Unpack a launched step's host copy (valid only during the call) into its statistics, loss and sample."""
    grad_host, offset = [], 0
    for shape, dtype in launch.layouts:
        n = math.prod(shape)
        grad_host.append(host[offset:offset + n].reshape(shape).to(dtype))
        offset += n
    stats = collector.finish(None, grad_host, launch.slow, launch.state)
    # host-side reads go through numpy: no further torch scalar reads (each is a sync on a device)
    after = offset + launch.sample_size
    loss = float(host.numpy()[after]) if launch.loss is None else launch.loss
    scale = float(host.numpy()[after + (launch.loss is None)]) if launch.scale_in_copy else None
    sample = host[offset:offset + launch.sample_size].clone() if launch.sample_size else None
    return HostRow(stats=stats, loss=loss, sample=sample, loss_scale=scale)


class HostPipeline:
    """The collected steps launched to the host and not yet read back, in launch order.

    Copies are blocking while the gradients are on the CPU and delayed (``non_blocking``, read once
    complete) on an accelerator; when the gradients move between the two, the copies in flight are
    read back first.
    """

    def __init__(self) -> None:
        self._transfer = HostTransfer(delayed=False)

    @property
    def delayed(self) -> bool:
        """Copies are read back later (accelerator), not at once."""
        return self._transfer.delayed

    def __len__(self) -> int:
        return len(self._transfer)

    def launch(self, collector: GradientCollector, packed: PackedStep, *, step: int, slow: bool, keep_out: bool,
               diagnosing: bool, on_row: Callable[[HostRow, StepLaunch], None]) -> StepLaunch:
        """Start the host copy of a step the collector just computed. ``on_row`` reads back the steps in
        flight first if the gradients changed device kind (CPU <-> accelerator)."""
        if self._transfer.delayed != collector.accelerator_path(packed.flat.device):
            self.read(collector, on_row, wait=True)
            self._transfer = HostTransfer(delayed=not self._transfer.delayed)
        launch = StepLaunch(step=step, slow=slow, layouts=packed.layouts, sample_size=packed.sample_size,
                            loss=packed.loss, state=collector.launched() if self._transfer.delayed else None,
                            keep_out=keep_out, diagnosing=diagnosing, scale_in_copy=packed.scale_in_copy)
        self._transfer.launch(packed.flat, launch)
        return launch

    def discard(self) -> None:
        """Drop the launched steps not read yet (their copies are waited for first: a buffer is never
        reused while a copy into it is in flight)."""
        self._transfer.discard()

    def read(self, collector: GradientCollector, on_row: Callable[[HostRow, StepLaunch], None],
             wait: bool = False) -> None:
        """Call ``on_row(row, launch)`` for each launched step whose copy is complete, oldest first;
        with ``wait``, for every one (waiting for copies in flight)."""
        self._transfer.consume(lambda host, launch: on_row(read_host_row(host, launch, collector), launch), wait=wait)


__all__ = ["HostPipeline", "DeviceRows", "HostRow", "PackedStep", "StepLaunch", "device_rows", "pack_step", "read_host_row"]
