"""gradwatch: gradient-flow diagnostics for PyTorch training loops."""

from gradwatch.findings import Diagnosis, Finding

__all__ = ["Diagnosis", "Finding"]
__version__ = "0.1.0"
