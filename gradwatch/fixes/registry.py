"""The registry of fixes (timm / BackPACK style): name -> class.

Example:
    >>> from gradwatch.fixes import get_fix, list_fixes
    >>> "swap_activation" in list_fixes()
    True
    >>> get_fix("swap_activation", to="leaky_relu").name
    'swap_activation'
"""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

from gradwatch.fixes.base import Fix

_REGISTRY: dict[str, type[Fix]] = {}
F = TypeVar("F", bound=type[Fix])


def register_fix(cls: F) -> F:
    """Class decorator adding a :class:`~gradwatch.fixes.base.Fix` subclass under ``cls.name``.

    Raises:
        ValueError: the name is empty or already taken by another class.
    """
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"fix name {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def list_fixes() -> list[str]:
    """Names of all registered fixes, in registration order."""
    return list(_REGISTRY)


def default_fixes() -> list[str]:
    """Names of the registered fixes the default policy may apply (all but the opt-in ones)."""
    return [name for name, cls in _REGISTRY.items() if not cls.opt_in]


def get_fix_class(name: str) -> type[Fix]:
    """The class registered as ``name``: what the fix itself knows (``kinds``, ``why``, ``preflight``).

    Raises:
        ValueError: unknown name (the message lists the registry).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown fix {name!r}; registered fixes: {list_fixes()}")
    return _REGISTRY[name]


def check_names(names: Any, what: str = "fix") -> list[str]:
    """Validate a list of fix names.

    Raises:
        TypeError: ``names`` is a plain string (a common slip for ``[name]``) or not iterable.
        ValueError: naming the unknown names and the registered ones.
    """
    if isinstance(names, str):
        raise TypeError(f"{what} names must be a list of names, got the string {names!r}; use [{names!r}]")
    names = list(names)
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown {what} names {unknown}; registered fixes: {list_fixes()}")
    return names


def get_fix(name: str, **options: Any) -> Fix:
    """A configured instance of the fix registered as ``name``.

    Args:
        name: a registered fix name (see :func:`list_fixes`).
        **options: the fix's own options (e.g. ``to="leaky_relu"`` for ``swap_activation``);
            unknown options are an error.

    Raises:
        ValueError: unknown name (the message lists the registry) or bad option values.
        TypeError: unknown option names.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown fix {name!r}; registered fixes: {list_fixes()}")
    cls = _REGISTRY[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown options {unknown} for fix {name!r}; allowed: {allowed}")
    return cls(**options)
