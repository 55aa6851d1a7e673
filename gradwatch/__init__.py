"""gradwatch: gradient-flow diagnostics for PyTorch training loops.

>>> watcher = gradwatch.watch(model)
>>> loss.backward(); watcher.step(); optimizer.step()
>>> print(watcher.diagnose())
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradwatch.diagnose import diagnose
    from gradwatch.findings import Diagnosis, Finding
    from gradwatch.fixes import apply_fixes, replay
    from gradwatch.history import History, HistoryView
    from gradwatch.preflight import PreflightResult, preflight
    from gradwatch.thresholds import Thresholds
    from gradwatch.watcher import GradWatcher, watch

# Public names are imported on first use (PEP 562): `gradwatch.<submodule>` must stay cheap, because
# TensorBoard imports the `gradwatch.dashboard` plugin at start-up, and the names below import torch.
_PUBLIC: dict[str, str] = {
    "diagnose": "gradwatch.diagnose",
    "Diagnosis": "gradwatch.findings",
    "Finding": "gradwatch.findings",
    "apply_fixes": "gradwatch.fixes",
    "replay": "gradwatch.fixes",
    "History": "gradwatch.history",
    "HistoryView": "gradwatch.history",
    "PreflightResult": "gradwatch.preflight",
    "preflight": "gradwatch.preflight",
    "Thresholds": "gradwatch.thresholds",
    "WatchOptions": "gradwatch.options",
    "GradWatcher": "gradwatch.watcher",
    "watch": "gradwatch.watcher",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif name.startswith("__"):
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    else:  # a submodule, e.g. `gradwatch.models` after a bare `import gradwatch` (imported eagerly before)
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'gradwatch' has no attribute {name!r}") from None
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


class _Package(types.ModuleType):
    """``gradwatch.diagnose`` and ``gradwatch.preflight`` are functions named like their modules:
    importing the submodule must not bind the module over the function (the import system sets the
    package attribute); the function is then looked up by ``__getattr__`` on first use."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "Diagnosis",
    "Finding",
    "GradWatcher",
    "History",
    "HistoryView",
    "PreflightResult",
    "Thresholds",
    "WatchOptions",
    "apply_fixes",
    "diagnose",
    "preflight",
    "replay",
    "watch",
]
__version__ = "0.1.0"
