"""gradwatch: gradient-flow diagnostics for PyTorch training loops.

>>> watcher = gradwatch.watch(model)
>>> loss.backward(); watcher.step(); optimizer.step()
>>> print(watcher.diagnose())
"""

from gradwatch.diagnose import diagnose
from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import apply_fixes, replay
from gradwatch.history import History, HistoryView
from gradwatch.preflight import PreflightResult, preflight
from gradwatch.thresholds import Thresholds
from gradwatch.watcher import GradWatcher, watch

__all__ = [
    "Diagnosis",
    "Finding",
    "GradWatcher",
    "History",
    "HistoryView",
    "PreflightResult",
    "Thresholds",
    "apply_fixes",
    "diagnose",
    "preflight",
    "replay",
    "watch",
]
__version__ = "0.1.0"
