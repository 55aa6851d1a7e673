"""Gradient statistics under ``16-mixed`` (a ``GradScaler``): unscaled rows, and overflow steps told apart.

Lightning unscales before ``on_before_optimizer_step``, except for fused optimizers, which unscale
inside ``step()``: their statistic rows are divided by ``scaler.get_scale()`` here. A non-finite step
is loss-scale calibration, not a failure, until the scale falls below 1.
"""

from __future__ import annotations

from typing import Any

import torch

from gradwatch.collect import scale_rows


class AmpUnscaler:
    """Divides statistic rows by the loss scale when the optimizer unscales inside ``step()`` (fused).

    The scale is the scaler's own device tensor: ``get_scale()`` would read it on the host, a device
    synchronisation at every step."""

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler
        self.factor: float | torch.Tensor | None = None

    def prepare(self, optimizer: Any) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)
        # torch marks optimizers that unscale inside step() with this attribute (GradScaler reads it too)
        if getattr(inner, "_step_supports_amp_scaling", False):
            scale = self._scale()
            if isinstance(scale, torch.Tensor):
                self.factor = torch.where(scale > 0, scale.double().reciprocal(), 1.0)
            else:
                self.factor = 1.0 / scale if scale > 0 else None
        else:
            self.factor = None  # Lightning already called scaler.unscale_(optimizer)

    def _scale(self) -> float | torch.Tensor:
        """The loss scale as the scaler keeps it: a device tensor once it exists (no host read)."""
        scale = getattr(self.scaler, "_get_scale_async", lambda: None)() if self.scaler.is_enabled() else None
        return scale if isinstance(scale, torch.Tensor) else float(self.scaler.get_scale())

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.factor is None else scale_rows(rows, self.factor)

    def nonfinite_is_real(self) -> tuple[bool, str]:
        """Whether non-finite gradients are a real problem now, and why: GradScaler halves its scale after
        every overflow, so below 1 the gradients are non-finite even without amplification."""
        scale = float(self.scaler.get_scale())
        if scale < 1.0:
            return True, f"gradients stay non-finite although the AMP loss scale fell to {scale:g}"
        return False, ""


__all__ = ["AmpUnscaler"]
