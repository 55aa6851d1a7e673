"""Shared helpers of the hardening tests: bitwise state comparison, event-file reading, log capture."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn


def _bits(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """Exact identity of a tensor: dtype, shape and raw bytes (NaN payloads and -0.0 included)."""
    t = t.detach().cpu().contiguous()
    return str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _flat(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = _bits(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}", out)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _flat(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = repr(value)


def state_bits(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Everything of the user's that gradwatch must not change, as comparable bytes: every parameter,
    gradient and buffer, train/eval modes, hooks registered on modules, the optimizer's state and groups."""
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        out[f"param:{name}"] = _bits(p)
        out[f"grad:{name}"] = None if p.grad is None else _bits(p.grad)
        out[f"requires_grad:{name}"] = p.requires_grad
    for name, b in model.named_buffers():
        out[f"buffer:{name}"] = _bits(b)
    for name, m in model.named_modules():
        out[f"training:{name}"] = m.training
        out[f"hooks:{name}"] = (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                                len(getattr(m, "_full_backward_hooks", None) or ()))
    out["tree"] = repr(model)
    if optimizer is not None:
        _flat(optimizer.state_dict(), "optimizer", out)
        out["optimizer_hooks"] = (len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks))
    return out


def assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"differs: {diff[:10]}"


def accumulate(path: Path) -> ea.EventAccumulator:
    """TensorBoard's own reader over a run directory, keeping every event."""
    acc = ea.EventAccumulator(str(path), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    return acc


def scalar_steps(path: Path, tag: str = "grad_norm/total") -> list[int]:
    return [e.step for e in accumulate(path).Scalars(tag)]


@contextmanager
def gradwatch_records(level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """Every record the 'gradwatch' logger emits (independent of pytest's caplog level handling)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("gradwatch")
    handler = Collect(level=level)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, old) if old else level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def errors(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.ERROR]
