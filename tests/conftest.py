"""Test-wide settings: deterministic seeds, a fixed thread count (the CI machine has 2 cores), and a guard
that no test leaves the logging configuration changed for the tests after it (an order dependence that once
made a log-counting test fail only in CI's test order)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _logging_left_as_found() -> Iterator[None]:
    logger = logging.getLogger("gradwatch")
    before = (logger.level, logging.getLogger().level)
    yield
    after = (logger.level, logging.getLogger().level)
    logger.setLevel(before[0])
    logging.getLogger().setLevel(before[1])
    assert after == before, (
        f"this test changed the logging levels (gradwatch, root) from {before} to {after}; "
        "use caplog.set_level, which restores them")
