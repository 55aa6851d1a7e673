"""The registry of fixes (timm / BackPACK style): name -> class, and every fact derived from the classes.

A fix is added by one module under ``gradwatch/fixes/`` whose class sets its facts
(:class:`~gradwatch.fixes.facts.FixFacts`) and is decorated with :func:`register_fix`, plus its
import in ``gradwatch/fixes/__init__.py``. The lists other modules need (names, the preflight
set, the structural set, the reasons a diagnosis prints) are queries here, never tables.

Importing this module imports the ``gradwatch.fixes`` package, which registers the built-in fixes.

Example:
    >>> from gradwatch.fixes import get_fix, list_fixes
    >>> "swap_activation" in list_fixes()
    True
    >>> get_fix("swap_activation", to="leaky_relu").name
    'swap_activation'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from gradwatch.fixes.facts import FixFacts

_REGISTRY: dict[str, type[FixFacts]] = {}
F = TypeVar("F", bound=type[FixFacts])


def register_fix(cls: F) -> F:
    """Class decorator adding a fix class under ``cls.name``.

    Raises:
        ValueError: the name is empty or already taken by another class, or ``effect`` is not set.
    """
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if getattr(cls, "effect", None) is None:
        raise ValueError(f"{cls.__name__} has no `effect`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"fix name {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def unregister_fix(name: str) -> None:
    """Remove the fix registered as ``name`` (a fix a test or a plugin registered for a while).

    Raises:
        ValueError: unknown name.
    """
    get_fix_class(name)
    del _REGISTRY[name]


def list_fixes() -> list[str]:
    """Names of all registered fixes, in registration order."""
    return list(_REGISTRY)


def fixes_where(fact: Callable[[type[FixFacts]], bool]) -> tuple[str, ...]:
    """Names of the registered fixes whose class satisfies ``fact``, in registration order."""
    return tuple(name for name, cls in _REGISTRY.items() if fact(cls))


def default_fixes() -> list[str]:
    """Names of the registered fixes the default policy may apply (all but the opt-in ones)."""
    return list(fixes_where(lambda cls: not cls.opt_in))


def preflight_fixes() -> tuple[str, ...]:
    """Names of the fixes :func:`gradwatch.preflight` applies by default (``Fix.preflight``)."""
    return fixes_where(lambda cls: cls.preflight)


def structural_fixes() -> tuple[str, ...]:
    """Names of the fixes that replace or wrap submodules (``Fix.effect == "structural"``)."""
    return fixes_where(lambda cls: cls.structural)


def gradient_cappers() -> tuple[str, ...]:
    """Names of the fixes that bound every step's gradient norm (``Fix.caps_gradients``)."""
    return fixes_where(lambda cls: cls.caps_gradients)


def fix_reason(kind: str, name: str) -> str:
    """Why the fix ``name`` treats a ``kind`` finding, as its class says (``Fix.why``); "" if it does not say."""
    cls = _REGISTRY.get(name)
    return str(cls.why.get(kind, "")) if cls is not None else ""


def get_fix_class(name: str) -> type[FixFacts]:
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


def get_fix(name: str, **options: Any) -> Any:
    """A configured instance of the fix registered as ``name`` (a :class:`~gradwatch.fixes.base.Fix`).

    Args:
        name: a registered fix name (see :func:`list_fixes`).
        **options: the fix's own options (e.g. ``to="leaky_relu"`` for ``swap_activation``);
            unknown options are an error.

    Raises:
        ValueError: unknown name (the message lists the registry) or bad option values.
        TypeError: unknown option names.
    """
    cls = get_fix_class(name)
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown options {unknown} for fix {name!r}; allowed: {allowed}")
    return cls(**options)
