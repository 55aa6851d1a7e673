"""The registry of reference cases, as in timm: :func:`register_model`, :func:`list_models`, :func:`create`.

:func:`register_twins` registers a problem case and its fixed twin from one builder, so the pair's
names, ``twin`` links and shared ``cure`` are written once.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable

import torch

from gradwatch.models.case import TWIN_SUFFIX, ReferenceCase
from gradwatch.models.recipe import Setup

log = logging.getLogger(__name__)

Factory = Callable[[int], ReferenceCase]

_REGISTRY: dict[str, Factory] = {}


def register_model(factory: Factory) -> Factory:
    """Register ``factory(seed) -> ReferenceCase`` under its function name (a decorator).

    :func:`create` calls the factory with the global RNG seeded by ``seed`` (and restored
    afterwards), so modules may use PyTorch's default initialisers; the data should come from a
    ``torch.Generator`` seeded with the same seed, so a problem and its twin see the same data.

    Raises:
        ValueError: if the name is already registered.
    """
    name = factory.__name__
    if name in _REGISTRY:
        raise ValueError(f"reference model {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory


def register_twins(
    name: str,
    build: Callable[[int, bool], Setup],
    *,
    problem: str,
    cure: tuple[str, ...],
    summaries: tuple[str, str],
    description: str,
    fixed_description: str,
) -> tuple[Factory, Factory]:
    """Register the problem case ``name`` and its twin ``name + TWIN_SUFFIX`` from one builder.

    Args:
        name: the problem case's registry name.
        build: ``build(seed, fixed)``: the problem's setup (``fixed=False``) or the twin's.
        problem: what the problem case shows (one of ``PROBLEMS``).
        cure: the fix names that turn the problem into the twin.
        summaries: one-line docstrings of the problem's factory and the twin's.
        description: the problem case's description (mechanism and cure).
        fixed_description: the twin's description.

    Returns:
        The two registered factories ``(problem, twin)``, for the family module to export.
    """
    fixed_name = name + TWIN_SUFFIX

    def problem_case(seed: int = 0) -> ReferenceCase:
        return build(seed, False).case(name, seed, problem=problem, twin=fixed_name, cure=cure, description=description)

    def fixed_case(seed: int = 0) -> ReferenceCase:
        return build(seed, True).case(fixed_name, seed, problem=None, twin=name, cure=cure, description=fixed_description)

    for factory, factory_name, summary in ((problem_case, name, summaries[0]), (fixed_case, fixed_name, summaries[1])):
        factory.__name__ = factory.__qualname__ = factory_name
        factory.__doc__ = summary
        factory.__module__ = build.__module__
        register_model(factory)
    return problem_case, fixed_case


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered cases matching a shell-style ``pattern`` (e.g. ``"*rnn*"``)."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatchcase(name, pattern))


def create(name: str, seed: int = 0) -> ReferenceCase:
    """Build the reference case ``name``: a new model and data set, bitwise identical for a seed.

    The global RNG is used for initialisation under ``torch.random.fork_rng``: the caller's RNG
    state is left untouched.

    Args:
        name: one of :func:`list_models`.
        seed: seeds the model's initialisation and the task's data. Default: ``0``.

    Raises:
        ValueError: if ``name`` is not registered (the message lists the registered names).
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown reference model {name!r}; available: {', '.join(list_models())}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        case = factory(seed)
    if case.name != name:
        raise ValueError(f"factory {name!r} returned a case named {case.name!r}")
    log.debug("created reference case %s (seed %d): problem=%s, twin=%s", name, seed, case.problem, case.twin)
    return case
