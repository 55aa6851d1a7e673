"""Helpers for users' own test suites: assert that a model's gradients flow."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradwatch.findings import Diagnosis
from gradwatch.preflight import Batch, probe
from gradwatch.thresholds import Thresholds


def assert_healthy_gradients(
    model: nn.Module,
    batch: Batch | Sequence[Batch],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    steps: int = 4,
    thresholds: Thresholds | None = None,
    ignore: Sequence[str] = (),
) -> Diagnosis:
    """Fail with the readable report if the model's gradients do not flow on ``batch``.

    Runs a few forward/backward passes (no optimizer step; the model is left bit for bit as it was),
    diagnoses them, and raises ``AssertionError`` carrying the report when any finding remains.

    Args:
        model: the model under test.
        batch: an ``(inputs, target)`` pair or a list of them.
        loss_fn: ``loss_fn(model(inputs), target)`` returns a scalar tensor.
        steps: passes to probe.
        thresholds: diagnosis thresholds.
        ignore: finding kinds to tolerate (e.g. ``("dead_units",)``).

    Returns:
        The diagnosis (healthy, or with ignored findings only).

    Example:
        >>> def test_my_model_trains():                                        # doctest: +SKIP
        ...     assert_healthy_gradients(MyModel(), (x, y), F.cross_entropy)
    """
    diagnosis = probe(model, batch, loss_fn, steps=steps, thresholds=thresholds)
    remaining = [f for f in diagnosis.findings if f.kind not in set(ignore)]
    if remaining:
        raise AssertionError(f"gradient flow is not healthy:\n{diagnosis}")
    return diagnosis
