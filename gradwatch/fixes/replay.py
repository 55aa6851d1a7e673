"""``replay``: re-apply a fix report's structural changes to a fresh instance of the model class.

A fixed model's ``state_dict`` has keys a fresh instance lacks (``net.2.1.running_mean``) and
lacks keys it has (``net.2.weight`` moved to ``net.2.0.weight``), so ``load_state_dict(strict=True)``
fails until the same structure is rebuilt. ``replay`` rebuilds it from the report's ops, in
the order they were applied; the weights then come from the checkpoint. In-place changes
(re-initialisation, clipping) are not structural and are not replayed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from torch import nn

from gradwatch.fixes import ops as ops_mod
from gradwatch.fixes.record import FixReport
from gradwatch.layers import unwrap_model

log = logging.getLogger(__name__)


def _as_report(report: FixReport | dict[str, Any] | str) -> FixReport:
    if isinstance(report, FixReport):
        return report
    if isinstance(report, str):
        try:
            report = json.loads(report)
        except json.JSONDecodeError as err:
            raise ops_mod.FixReportError(f"fix report is not valid JSON: {err}") from None
    if isinstance(report, dict):
        try:
            return FixReport.from_dict(report)
        except (TypeError, ValueError) as err:
            raise ops_mod.FixReportError(f"malformed fix report: {err}") from None
    raise ops_mod.FixReportError(f"a fix report must be a FixReport, a dict or a JSON string, got {type(report).__name__}")


def replay(model: nn.Module, report: FixReport | dict[str, Any] | str) -> list[dict[str, Any]]:
    """Rebuild the structure a :class:`FixReport` describes on ``model`` (a fresh instance), in place.

    All or nothing: the whole report is validated first, and if any op does not fit the model
    (a path that does not exist, another class than the one the op was applied to), every op
    already applied is undone before the error is raised.

    Args:
        model: a fresh instance of the fixed model's class (wrappers are looked through).
        report: the report returned by :func:`~gradwatch.fixes.apply_fixes`, its ``to_dict()``,
            or its ``to_json()``.

    Returns:
        The ops applied, in order.

    Raises:
        FixReportError: (a ``ValueError``; formerly ``RecordError``) naming the change, the op and what does not fit.

    Example:
        >>> fresh = MyModel()                                    # doctest: +SKIP
        >>> replay(fresh, json.load(open("fixes.json")))          # doctest: +SKIP
        >>> fresh.load_state_dict(torch.load("fixed.pt"))          # doctest: +SKIP
    """
    report = _as_report(report)
    ops: list[tuple[str, dict[str, Any]]] = []
    for i, change in enumerate(report.changes):
        if change.status != "applied" or not change.structural:
            continue
        if not isinstance(change.ops, list) or not change.ops:
            raise ops_mod.FixReportError(f"change #{i} ({change.fix}) is structural but has no ops")
        for op in change.ops:
            where = f"change #{i} ({change.fix})"
            try:
                ops_mod.validate(op)
            except ops_mod.FixReportError as err:
                raise ops_mod.FixReportError(f"{where}: {err}") from None
            ops.append((where, dict(op)))
    target = unwrap_model(model)
    undo = ops_mod.Undo()
    try:
        for where, op in ops:
            try:
                ops_mod.apply(target, op, undo)
            except Exception as err:  # whatever a report makes fail while building, it is the report's fault
                raise ops_mod.FixReportError(f"{where}: {err}; nothing was changed") from None
    except Exception:
        undo.revert()
        raise
    log.info("gradwatch replay: %d structural ops applied to %s", len(ops), type(target).__name__)
    return [op for _, op in ops]
