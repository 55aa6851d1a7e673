"""gradwatch: gradient-flow diagnostics for PyTorch training loops.

>>> watcher = gradwatch.watch(model)
>>> loss.backward(); watcher.step(); optimizer.step()
>>> print(watcher.diagnose())
"""

from gradwatch.diagnose import diagnose
from gradwatch.findings import Diagnosis, Finding
from gradwatch.history import History, HistoryView
from gradwatch.thresholds import Thresholds
from gradwatch.watcher import GradWatcher, watch

__all__ = ["Diagnosis", "Finding", "GradWatcher", "History", "HistoryView", "Thresholds", "diagnose", "watch"]
__version__ = "0.1.0"
