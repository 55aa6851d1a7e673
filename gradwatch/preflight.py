"""Preflight: probe a model's gradient flow on real data before training, and fix it up front.

Structural fixes are easiest before training starts: nothing to roll back, no optimizer state to
migrate, no checkpoint to replay. :func:`preflight` runs a few forward/backward passes on real
batches (no optimizer step), diagnoses them, restores everything the probes touched (gradients,
BatchNorm statistics, train/eval modes — bit for bit), and applies the allowed fixes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradwatch.findings import Diagnosis
from gradwatch.fixes.registry import list_fixes, preflight_fixes
from gradwatch.thresholds import Thresholds

log = logging.getLogger("gradwatch")

Batch = Any


def __getattr__(name: str) -> Any:
    """``PREFLIGHT_FIXES``: deprecated, derived from the fixes' ``preflight`` flag (use
    ``gradwatch.fixes.registry.preflight_fixes()``)."""
    if name == "PREFLIGHT_FIXES":
        return preflight_fixes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class PreflightResult:
    """What :func:`preflight` found and did: ``diagnosis`` and the fix ``report`` (``None`` if not fixing)."""

    diagnosis: Diagnosis
    report: Any = None

    def __str__(self) -> str:
        return str(self.diagnosis) + (f"\n\n{self.report}" if self.report is not None else "")


def split_batch(batch: Batch) -> tuple[Any, Any]:
    """``(inputs, target)`` from a batch: a ``(inputs, target)`` pair; ``inputs`` may be a tensor,
    a tuple of positional arguments or a dict of keyword arguments."""
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"batch must be an (inputs, target) pair, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
        + "; inputs may be a tensor, a tuple of positional arguments or a dict of keyword arguments"
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def probe(
    model: nn.Module,
    batches: Batch | Sequence[Batch],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    steps: int = 6,
    thresholds: Thresholds | None = None,
) -> Diagnosis:
    """Diagnose ``steps`` forward/backward passes (cycling through ``batches``) and leave the model as it was."""
    from gradwatch.fixes import snapshot
    from gradwatch.watcher import GradWatcher

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model_output, target), got {type(loss_fn).__name__}")
    many = isinstance(batches, list) and batches and isinstance(batches[0], list | tuple) and len(batches[0]) == 2 \
        and not isinstance(batches[0][0], int | float)
    pairs = [split_batch(b) for b in batches] if many else [split_batch(batches)]
    th = thresholds or Thresholds()
    th = th.updated(window=steps, min_steps=min(th.min_steps, steps))
    snap = snapshot(model)
    watcher = GradWatcher(model, activation_every_n_steps=1, slow_stats_every_n=1, track_updates=False,
                          diagnose_every_n_steps=0, histogram_every_n_steps=0, thresholds=th, on_error="raise",
                          name="preflight")
    try:
        for i in range(steps):
            inputs, target = pairs[i % len(pairs)]
            for p in model.parameters():
                p.grad = None
            loss = loss_fn(call_model(model, inputs), target)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                f"{tuple(getattr(loss, 'shape', ()))}")
            loss.backward()
            watcher.step(loss)
        return watcher.diagnose(th)
    finally:
        watcher.close()
        snap.restore()


def preflight(
    model: nn.Module,
    batch: Batch | Sequence[Batch],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    fix: bool | Iterable[str] = True,
    steps: int = 6,
    thresholds: Thresholds | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> PreflightResult:
    """Probe gradient flow on real data, diagnose, and apply the allowed fixes before training.

    Args:
        model: the model, before training (and before a DDP/FSDP wrapper is built).
        batch: an ``(inputs, target)`` pair or a list of them; ``loss_fn(model(inputs), target)``.
        loss_fn: returns a scalar loss tensor.
        optimizer: if it already exists, new parameters are added to it (else build it after).
        fix: ``True`` (the fixes that change the model: those whose class sets ``preflight = True``,
            see :func:`~gradwatch.fixes.registry.preflight_fixes`), ``False`` (recommend only: the
            report is a dry run with copy-pasteable code) or a list of fix names.
        steps: forward/backward passes to probe (no optimizer step is taken).
        thresholds: diagnosis thresholds (the window is set to ``steps``).
        options: per-fix options for ``apply_fixes``.

    Returns:
        :class:`PreflightResult` with the diagnosis made before any fix and the fix report.

    Example:
        >>> result = gradwatch.preflight(model, (x, y), torch.nn.functional.cross_entropy)  # doctest: +SKIP
        >>> print(result)                                                                    # doctest: +SKIP
    """
    from gradwatch.fixes import apply_fixes

    if fix is True:
        allowed: tuple[str, ...] = preflight_fixes()
    elif fix is False:
        allowed = ()
    else:
        allowed = tuple([fix] if isinstance(fix, str) else fix)
        unknown = [n for n in allowed if n not in list_fixes()]
        if unknown:
            raise ValueError(f"fix: unknown fix name(s) {unknown}; allowed: {tuple(list_fixes())}")
    diagnosis = probe(model, batch, loss_fn, steps=steps, thresholds=thresholds)
    first = batch[0] if isinstance(batch, list) and batch and isinstance(batch[0], list | tuple) else batch
    inputs, _ = split_batch(first)
    report = apply_fixes(model, diagnosis, optimizer=optimizer, only=allowed or None, dry_run=not allowed,
                         example_input=inputs, options=options)
    if report.changed:
        log.info("gradwatch preflight applied: %s", "; ".join(c.summary() for c in report.applied))
    return PreflightResult(diagnosis=diagnosis, report=report)
