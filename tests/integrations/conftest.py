"""Lightning integration tests: skipped when lightning is not installed; helpers importable by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
