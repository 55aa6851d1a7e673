"""``WatchOptions``: every option of :func:`gradwatch.watch`, validated once, in one place.

:class:`~gradwatch.watcher.GradWatcher` builds one from its keyword arguments; the training
integrations build one in their constructors (long before there is a model to watch), so a typo
fails where it was made, with the same message whichever entry point was used. Errors name the
bad value and the allowed ones; an unknown option name is an error, never ignored.

The small checks (:func:`check_count`, :func:`check_names`) are public so that an integration's own
options (``fail_on``, ``metrics``...) read the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradwatch.fixes.registry import default_fixes, list_fixes
from gradwatch.thresholds import Thresholds
from gradwatch.transfer import HOT_PATHS

#: What ``on_error`` accepts.
ON_ERROR: tuple[str, ...] = ("detach", "raise")


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum`` (``bool`` is not a count).

    Raises:
        ValueError: naming the option, the bound and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_names(name: str, value: str | Iterable[str], allowed: Sequence[str], what: str = "value") -> tuple[str, ...]:
    """``value`` (one name or several) as a tuple without repeats, if every name is in ``allowed``.

    Raises:
        ValueError: ``"<name> has unknown <what>(s) [...]; allowed: (...)"``.
    """
    names = (value,) if isinstance(value, str) else tuple(value)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"{name} has unknown {what}(s) {unknown}; allowed: {tuple(allowed)}")
    return tuple(dict.fromkeys(names))


def auto_fix_names(value: bool | str | Iterable[str] | None) -> tuple[str, ...]:
    """The fixes ``auto_fix=value`` allows: ``False`` none, ``True`` the default policy's (opt-in fixes
    such as ``skip_spikes`` only when named), or the names given.

    Raises:
        ValueError: an unknown fix name.
    """
    if value is False or value is None:
        return ()
    if value is True:
        return tuple(default_fixes())
    return check_names("auto_fix", value, list_fixes(), what="fix name")


def fix_options(name: str, value: Any) -> dict[str, dict[str, Any]] | None:
    """Per-fix options (``{"swap_activation": {"to": "leaky_relu"}}``) copied, or ``None``.

    Raises:
        TypeError: not a dict of dicts.
        ValueError: a key that is not a fix name.
    """
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise TypeError(f"{name} must be a dict of per-fix option dicts, got {value!r}")
    check_names(name, list(value), list_fixes())
    return {k: dict(v) for k, v in value.items()}


@dataclass(frozen=True)
class WatchOptions:
    """The options of :func:`gradwatch.watch` / :class:`~gradwatch.watcher.GradWatcher`, checked on creation.

    The fields are ``GradWatcher``'s keyword arguments, with the same defaults and meanings (see its
    docstring). ``auto_fix`` is stored as the tuple of fix names it allows (:func:`auto_fix_names`)
    and ``auto_fix_options`` as a copy.

    Raises:
        TypeError: a wrongly typed ``optimizer``, ``thresholds``, ``scaler`` or ``auto_fix_options``.
        ValueError: a count or cadence out of range, an unknown ``on_error``, ``hot_path`` or fix name.

    Example:
        >>> WatchOptions(every_n_steps=2).every_n_steps
        2
        >>> WatchOptions.build("MyCallback", every_n_step=2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: MyCallback: unknown or inapplicable option(s) ['every_n_step']; allowed: [...]
    """

    optimizer: torch.optim.Optimizer | None = None
    hook_optimizer: bool = True
    log_dir: Any = None
    every_n_steps: int = 1
    slow_stats_every_n: int = 10
    activations: bool = True
    activation_every_n_steps: int = 50
    histogram_every_n_steps: int = 100
    histogram_max_elements: int | None = 1 << 20
    figure_every_n_steps: int = 2000
    diagnose_every_n_steps: int = 100
    thresholds: Thresholds | None = None
    history_capacity: int = 1000
    track_updates: bool = True
    auto_fix: bool | Iterable[str] = False
    auto_fix_probe_steps: int = 50
    auto_fix_verify_steps: int = 50
    auto_fix_options: dict[str, dict[str, Any]] | None = None
    on_error: str = "detach"
    name: str | None = None
    sinks: Iterable[Any] = field(default=())
    scaler: Any = None
    hot_path: str = "auto"

    def __post_init__(self) -> None:
        if self.optimizer is not None and not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        for name in ("every_n_steps", "slow_stats_every_n", "activation_every_n_steps", "auto_fix_probe_steps",
                     "auto_fix_verify_steps"):
            check_count(name, getattr(self, name))
        check_count("history_capacity", self.history_capacity, minimum=2)  # rates and trends need two steps
        for name in ("histogram_every_n_steps", "figure_every_n_steps", "diagnose_every_n_steps"):
            check_count(name, getattr(self, name), minimum=0)
        if self.histogram_max_elements is not None:
            check_count("histogram_max_elements", self.histogram_max_elements)
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'detach' or 'raise', got {self.on_error!r}")
        if self.hot_path not in HOT_PATHS:
            raise ValueError(f"hot_path must be one of {HOT_PATHS}, got {self.hot_path!r}")
        if self.thresholds is not None and not isinstance(self.thresholds, Thresholds):
            raise TypeError(f"thresholds must be a gradwatch.Thresholds, got {type(self.thresholds).__name__}")
        if self.scaler is not None and not callable(getattr(self.scaler, "get_scale", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(self.scaler).__name__}")
        object.__setattr__(self, "auto_fix", auto_fix_names(self.auto_fix))
        object.__setattr__(self, "auto_fix_options", fix_options("auto_fix_options", self.auto_fix_options))
        object.__setattr__(self, "sinks", tuple(self.sinks))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option name, in ``GradWatcher``'s order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, caller: str, exclude: Iterable[str] = (), **options: Any) -> WatchOptions:
        """Options given to ``caller`` (named in errors), which does not take the ``exclude`` ones.

        Raises:
            TypeError: an unknown or excluded option name (the message lists the allowed ones), or a
                wrongly typed value.
            ValueError: a value out of range.
        """
        excluded = set(exclude)
        allowed = [n for n in cls.names() if n not in excluded]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"{caller}: unknown or inapplicable option(s) {unknown}; allowed: {allowed}")
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{caller}: {exc}") from None

    def replace(self, **changes: Any) -> WatchOptions:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :func:`gradwatch.watch` (values shared, not copied)."""
        return {name: getattr(self, name) for name in self.names()}


__all__ = ["ON_ERROR", "WatchOptions", "auto_fix_names", "check_count", "check_names", "fix_options"]
