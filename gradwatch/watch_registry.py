"""One open watcher per model: two watchers on one model would double every hook and every record."""

from __future__ import annotations

import weakref
from typing import Protocol

from torch import nn


class _Watcher(Protocol):
    name: str
    closed: bool


_WATCHED: weakref.WeakKeyDictionary[nn.Module, _Watcher] = weakref.WeakKeyDictionary()


def claim(model: nn.Module, watcher: _Watcher) -> None:
    """Register ``watcher`` as ``model``'s watcher.

    Raises:
        RuntimeError: another watcher of ``model`` is still open.
    """
    other = _WATCHED.get(model)
    if other is not None and not other.closed:
        raise RuntimeError(
            f"gradwatch.watch: this {type(model).__name__} is already watched by another GradWatcher "
            f"({other.name!r}). Call .close() on it first (or use `with gradwatch.watch(...)`)."
        )
    _WATCHED[model] = watcher


def release(model: nn.Module, watcher: _Watcher) -> None:
    """Forget ``watcher`` as ``model``'s watcher (a later one may claim the model)."""
    if _WATCHED.get(model) is watcher:
        del _WATCHED[model]
