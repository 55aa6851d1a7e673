"""Log a repeated event once, then count it: the 1st, 10th, 100th, ... occurrence is logged.

A hook that fires every step (a clipper dropping NaN gradients, a spike skipper) must not write the
same line 200 times in 200 steps; the count still tells how often it happened.
"""

from __future__ import annotations

import logging
from typing import Any


class RepeatedLog:
    """Logs a message at its 1st, 10th, 100th, ... occurrence per key, with the count so far.

    Args:
        logger: where to log.
        level: the logging level (default ``WARNING``).

    Example:
        >>> once = RepeatedLog(logging.getLogger("gradwatch"))
        >>> for _ in range(200):
        ...     once("nan", "non-finite gradient norm; step skipped")  # logged 3 times: 1st, 10th, 100th
    """

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING):
        self.logger = logger
        self.level = level
        self.counts: dict[str, int] = {}

    def __call__(self, key: str, msg: str, *args: Any) -> bool:
        """Count one occurrence of ``key``; log ``msg % args`` if it is the 1st, 10th, 100th, ...; returns
        whether it was logged."""
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        if n == 1:
            self.logger.log(self.level, msg + " (repeats are counted, logged at the 10th, 100th, ...)", *args)
            return True
        if _power_of_ten(n):
            self.logger.log(self.level, msg + " (%d times so far)", *args, n)
            return True
        return False


def _power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1
