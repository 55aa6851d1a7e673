"""``apply_fixes``: turn a diagnosis into changes to the live model (or, in a dry run, into code).

Policy (which fixes are applied):
    * Findings are handled in the diagnosis' order (most severe first).
    * For each finding, its ranked ``fixes`` are tried in order (restricted to ``only`` when
      given) and **the first one that applies** is applied; those tried before it and refused
      are recorded with their reason, those after it are not tried. ``lower_lr`` is advice: when
      it is the first applicable fix it is recorded as ``"recommended"`` and nothing changes.
    * ``he_init`` follows ``swap_activation`` onto the ReLU family, on the layers feeding the
      swapped modules (when ``only`` allows ``he_init``): a ReLU stack keeping a sigmoid-era
      initialisation loses signal with depth. Those layers may go beyond ``finding.layers`` (a
      vanishing finding names the early layers, but the activations it names run all the way
      down): every layer feeding a swapped activation is re-initialised, so that the whole ReLU
      stack is at He scale.
    * A fix acts only on the layers its finding names; a module already handled by the same fix
      for an earlier finding is not handled twice (and when that fix already handles every layer
      the finding names, the finding is treated: no further fix is tried), and at most one
      clipper is installed per optimizer.
    * Opt-in fixes (``Fix.opt_in``, e.g. ``skip_spikes``) are applied only when ``only`` names them.
    * A healthy diagnosis changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes.base import ExampleInput, Fix, FixContext
from gradwatch.fixes.record import Change, FixReport
from gradwatch.fixes.registry import check_names, get_fix, list_fixes
from gradwatch.layers import observe_structure, unwrap_model

log = logging.getLogger(__name__)


def _structure(model: nn.Module, diagnosis: Diagnosis, example_input: ExampleInput, notes: list[str]) -> dict[str, Any]:
    if diagnosis.structure:
        return dict(diagnosis.structure)
    if example_input is None:
        notes.append(
            "no observed forward structure (Diagnosis.structure is empty, no example_input): fixes that need "
            "tensor shapes refuse"
        )
        return {}
    notes.append("forward structure observed from example_input")
    if isinstance(example_input, dict):
        return observe_structure(model, **example_input)
    if isinstance(example_input, tuple | list):
        return observe_structure(model, *example_input)
    return observe_structure(model, example_input)


def _fixes(options: dict[str, dict[str, Any]] | None) -> dict[str, Fix]:
    options = dict(options or {})
    check_names(list(options), what="options")
    for name, opts in options.items():
        if not isinstance(opts, dict):
            raise TypeError(f"options[{name!r}] must be a dict of that fix's options, got {type(opts).__name__}")
    return {name: get_fix(name, **options.get(name, {})) for name in list_fixes()}


def apply_fixes(
    model: nn.Module,
    diagnosis: Diagnosis,
    optimizer: torch.optim.Optimizer | None = None,
    only: Iterable[str] | None = None,
    dry_run: bool = False,
    *,
    example_input: ExampleInput = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> FixReport:
    """Apply the recommended fixes of ``diagnosis`` to ``model`` in place; return a report of every change.

    Args:
        model: the model the diagnosis is about (``torch.compile`` and DDP wrappers are looked
            through; structural fixes refuse a DDP-wrapped model).
        diagnosis: a :class:`~gradwatch.Diagnosis`; its ``structure`` tells fixes the layouts.
        optimizer: the live optimizer. New parameters join it (``add_param_group`` with the
            hyperparameters of the group of the layer they replace or wrap), removed ones leave it
            with their state, re-initialised ones have their state reset; clipping installs itself
            on it. Default ``None``: the report says when the optimizer must be rebuilt.
        only: restrict to these fix names (default: all registered fixes).
        dry_run: change nothing; the report's changes are ``"planned"`` and ``report.code`` is
            copy-pasteable code doing the same on your own model.
        example_input: model inputs for one batch (a tensor, a tuple of positional arguments or a
            dict of keyword arguments - not the targets). Used to observe the structure when the
            diagnosis has none, and by ``insert_batchnorm`` to keep the output unchanged at insertion.
        options: per-fix options, e.g. ``{"swap_activation": {"to": "leaky_relu"}}``.

    Returns:
        A :class:`~gradwatch.fixes.record.FixReport`; ``report.to_json()`` persists it and
        :func:`~gradwatch.fixes.replay` re-applies its structural changes to a fresh model.

    Raises:
        TypeError: ``diagnosis`` is not a Diagnosis, or ``only`` is a plain string.
        ValueError: unknown fix names in ``only`` or ``options`` (the message lists the registry).

    Example:
        >>> report = apply_fixes(model, diagnosis, optimizer=opt)  # doctest: +SKIP
        >>> print(report)                                           # doctest: +SKIP
    """
    if not isinstance(diagnosis, Diagnosis):
        raise TypeError(f"diagnosis must be a gradwatch Diagnosis, got {type(diagnosis).__name__}")
    allowed = set(check_names(only, what="only")) if only is not None else None
    fixes = _fixes(options)
    report = FixReport(dry_run=dry_run)
    if diagnosis.healthy:
        return report
    inner = unwrap_model(model)
    structure = _structure(inner, diagnosis, example_input, report.notes)
    ctx = FixContext(model, structure, optimizer=optimizer, example_input=example_input)
    for finding in diagnosis.findings:
        _treat(ctx, finding, fixes, allowed, dry_run, report)
    report.clippers = list(ctx.clippers)
    structural = [c for c in report.applied if c.structural]
    if structural and optimizer is None and any(c.params_added or c.params_removed for c in structural):
        report.notes.append("parameters were added or removed and no optimizer was given: build the optimizer now")
    if structural and diagnosis.structure:
        report.notes.append("the model's structure changed: Diagnosis.structure describes the model before the fixes")
    return report


def _treat(
    ctx: FixContext,
    finding: Finding,
    fixes: dict[str, Fix],
    allowed: set[str] | None,
    dry_run: bool,
    report: FixReport,
) -> None:
    ranked = [name for name in finding.fixes
              if (name in allowed if allowed is not None else not fixes[name].opt_in)]
    if not ranked:
        if finding.fixes:
            report.notes.append(f"{finding.kind} on {list(finding.layers)}: none of {list(finding.fixes)} is allowed by only=")
        return
    for name in ranked:
        change = fixes[name].apply(ctx, finding, dry_run=dry_run)
        report.changes.append(change)
        if change.status == "refused":
            if change.refused and all((name, t) in ctx.done for t in change.refused):
                return  # this fix already treats every layer of the finding (for an earlier finding)
            continue
        if name == "swap_activation" and (allowed is None or "he_init" in allowed):
            _follow_with_he_init(ctx, finding, change, fixes["he_init"], dry_run, report)
        return


def _follow_with_he_init(
    ctx: FixContext, finding: Finding, swap: Change, he_init: Fix, dry_run: bool, report: FixReport
) -> None:
    if swap.details.get("kind") not in ("relu", "leaky"):
        return
    feeding = [ctx.topology.feeding_layer(act) for act in swap.targets]
    layers = [n for n in dict.fromkeys(feeding) if n is not None]
    if not layers:
        return
    reason = "follows swap_activation: a ReLU-family stack needs He scale to keep the signal's variance"
    change = he_init.apply(ctx, finding, targets=layers, dry_run=dry_run)
    if change.status != "refused":
        change.reason = f"{reason}; {change.reason}"
    report.changes.append(change)
