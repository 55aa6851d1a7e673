"""The report of what :func:`~gradwatch.fixes.apply_fixes` did (:class:`FixReport`): plain data, JSON round-trip.

One :class:`Change` per fix that was tried on a finding: applied, planned (dry run),
recommended (advice only), or refused (with the reason). Structural changes carry the
``ops`` that :func:`~gradwatch.fixes.replay` re-applies to a fresh model, so a checkpoint of a
fixed model can be loaded strictly.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

REPORT_VERSION = 1
Status = Literal["applied", "planned", "recommended", "refused"]
STATUSES: tuple[str, ...] = ("applied", "planned", "recommended", "refused")


@dataclass
class Change:
    """One fix tried on one finding.

    Attributes:
        fix: registry name of the fix (``"swap_activation"``...).
        finding: the finding's kind (``"vanishing"``...), or ``""`` when called directly.
        status: ``"applied"`` (the model or optimizer changed), ``"planned"`` (dry run: would
            apply), ``"recommended"`` (advice only, nothing to apply), ``"refused"`` (cannot
            apply; ``reason`` says why and nothing changed).
        reason: why the fix applies (from the cause) or why it does not.
        targets: the module names the fix acted on, as named before any fix.
        layers: where those modules are after the change (names may move into wrappers).
        refused: ``{module name: reason}`` for named modules the fix had to leave alone.
        structural: True when the module tree changes.
        ops: replayable structural operations (see :mod:`gradwatch.fixes.ops`).
        params_added / params_removed: qualified parameter names (after / before the change).
        optimizer: what happened to the optimizer (``"updated: ..."``, ``"rebuild required: ..."``,
            ``"state reset for N parameters"``, ``"n/a"``).
        before / after: ``{path: description}`` of the modules before and after.
        code: copy-pasteable Python doing the same on the user's own ``model``.
        imports: import lines ``code`` needs.
        details: fix-specific numbers (thresholds, init scales, factors...).
    """

    fix: str
    finding: str = ""
    status: str = "applied"
    reason: str = ""
    targets: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    structural: bool = False
    ops: list[dict[str, Any]] = field(default_factory=list)
    params_added: list[str] = field(default_factory=list)
    params_removed: list[str] = field(default_factory=list)
    optimizer: str = "n/a"
    before: dict[str, str] = field(default_factory=dict)
    after: dict[str, str] = field(default_factory=dict)
    code: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Change.status={self.status!r} is not one of {STATUSES}")

    @property
    def applied(self) -> bool:
        return self.status == "applied"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Change:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Change fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def summary(self) -> str:
        where = ", ".join(self.targets) if self.targets else "-"
        head = f"[{self.status}] {self.fix}"
        if self.finding:
            head += f" ({self.finding})"
        return f"{head} on {where}: {self.reason}"


@dataclass
class FixReport:
    """Everything :func:`~gradwatch.fixes.apply_fixes` did, in order; ``str(report)`` reads it.

    Attributes:
        changes: one :class:`Change` per fix tried, in the order tried.
        dry_run: True when nothing was changed (``changes`` are ``"planned"``).
        notes: remarks about the run as a whole (structure source, optimizer...).
        clippers: the live :class:`~gradwatch.fixes.clipping.GradientClipper` objects installed
            (not serialised; remove one with ``clipper.remove()``).
    """

    changes: list[Change] = field(default_factory=list)
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)
    clippers: list[Any] = field(default_factory=list, repr=False, compare=False)

    @property
    def applied(self) -> list[Change]:
        return [c for c in self.changes if c.status == "applied"]

    @property
    def changed(self) -> bool:
        """True when the model or the optimizer was changed."""
        return bool(self.applied)

    def touched_paths(self) -> set[str]:
        """Module paths whose parameters or buffers the applied changes created or rewrote (what other
        processes must receive after a fix)."""
        out: set[str] = set()
        for change in self.applied:
            out.update(change.layers)
            out.update(op["path"] for op in change.ops)
        return out

    @property
    def optimizer_rebuild_required(self) -> bool:
        """True when parameters were added or removed and no optimizer was given to update."""
        return any(c.optimizer.startswith("rebuild required") for c in self.applied)

    @property
    def code(self) -> str:
        """All applied, planned or recommended changes as one copy-pasteable Python snippet (imports
        first); refused fixes that still have advice as code (clipping without an optimizer) follow
        as such, with the reason in a comment."""
        imports: list[str] = []
        lines: list[str] = []
        for c in self.changes:
            if not c.code or (c.status == "refused" and not c.details.get("code_is_advice")):
                continue
            for line in c.imports:
                if line not in imports:
                    imports.append(line)
            head = f"# {c.fix}" + (f" ({c.finding})" if c.finding else "")
            if c.status == "refused":
                head += f" - not applied: {c.reason}"
            lines.append(head)
            lines.extend(c.code)
        return "\n".join(imports + ([""] if imports else []) + lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "dry_run": self.dry_run,
            "notes": list(self.notes),
            "changes": [c.to_dict() for c in self.changes],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FixReport:
        """Rebuild a report from :meth:`to_dict` output.

        Raises:
            ValueError: wrong version or malformed changes, naming what is wrong.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a fix report must be a dict, got {type(data).__name__}")
        version = data.get("version")
        if version != REPORT_VERSION:
            raise ValueError(f"fix report version {version!r} is not supported; expected {REPORT_VERSION}")
        changes = data.get("changes")
        if not isinstance(changes, list) or not all(isinstance(c, dict) for c in changes):
            raise ValueError("fix report 'changes' must be a list of dicts")
        return cls(
            changes=[Change.from_dict(c) for c in changes],
            dry_run=bool(data.get("dry_run", False)),
            notes=list(data.get("notes", [])),
        )

    @classmethod
    def from_json(cls, text: str) -> FixReport:
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        if not self.changes:
            return "gradwatch fixes: nothing to do"
        title = "gradwatch fixes (dry run: nothing changed)" if self.dry_run else "gradwatch fixes"
        lines = [title]
        for c in self.changes:
            lines.append("  " + c.summary())
            for name, why in c.refused.items():
                lines.append(f"      left {name} alone: {why}")
            if c.status == "applied" and (c.params_added or c.params_removed):
                lines.append(f"      parameters +{len(c.params_added)} -{len(c.params_removed)}; optimizer: {c.optimizer}")
        lines.extend(f"  note: {n}" for n in self.notes)
        if self.code:
            lines.append("  code for your own model:")
            lines.extend("    " + line for line in self.code.splitlines())
        return "\n".join(lines)


def to_plain(data: Any) -> Any:
    """``data`` as plain JSON-able Python: what a checkpoint may hold under ``torch.load(weights_only=True)``
    (tensors and numpy values become lists and numbers, tuples and sets lists, anything else its ``str``)."""
    return json.loads(json.dumps(data, default=_jsonable))


def _jsonable(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)  # tensors, numpy arrays and scalars
    if callable(tolist):
        return tolist()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


@dataclass
class FixRecord:
    """A :class:`FixReport` in effect on a model, as a training framework keeps it in its checkpoints.

    ``to_dict()`` is plain JSON-able data (what ``torch.load(weights_only=True)`` accepts):
    ``{"id", "source", "step", "report": FixReport.to_dict()}``; ``from_dict`` reads it back.

    Attributes:
        source: who applied it (``"preflight"``, ``"auto_fix"``...).
        step: the training step it was applied at (``None`` before training).
        report: what was changed.
        id: unique per record, so a record is replayed once per model instance.
    """

    source: str
    step: int | None
    report: FixReport
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def structural(self) -> bool:
        """True when the record changed the module tree (a fresh model needs it replayed)."""
        return any(c.structural for c in self.report.applied)

    @property
    def changes_parameters(self) -> bool:
        """True when the record added or removed parameters (the optimizer's groups changed)."""
        return any(c.params_added or c.params_removed for c in self.report.applied)

    def to_dict(self) -> dict[str, Any]:
        return to_plain({"id": self.id, "source": self.source, "step": self.step, "report": self.report.to_dict()})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FixRecord:
        """Rebuild a record from :meth:`to_dict` output.

        Raises:
            ValueError: a malformed record or report, naming what is wrong.
        """
        if not isinstance(data, dict) or "report" not in data:
            raise ValueError(f"a fix record must be a dict with a 'report', got {data!r:.200}")
        step = data.get("step")
        return cls(source=str(data.get("source", "")), step=None if step is None else int(step),
                   report=FixReport.from_dict(data["report"]), id=str(data.get("id") or uuid.uuid4().hex))
