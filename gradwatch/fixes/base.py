"""What every fix is: a name, ``applies`` (and why not), ``apply`` (a :class:`Change`), ``code`` (a snippet).

A fix first *plans* (pure: looks at the model, the finding and the observed forward pass,
changes nothing), then *executes* the plan. ``applies``, ``code`` and a dry run only plan, so
they can never change the model. Execution is all-or-nothing per fix: structural ops are
applied with an undo log, and the optimizer is told about added and removed parameters only
once the model change has succeeded.

Several fixes may act in one :func:`~gradwatch.fixes.apply_fixes` call; they share a
:class:`FixContext`, which remembers where modules moved (``net.2`` -> ``net.2.0`` after a
BatchNorm was inserted) and which activations were swapped, so that later fixes (and their code
snippets) address the model as it is after the earlier ones.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch.findings import Finding
from gradwatch.fixes import ops as ops_mod
from gradwatch.fixes import optim as optim_mod
from gradwatch.fixes import paths
from gradwatch.fixes.facts import FixFacts
from gradwatch.fixes.record import Change
from gradwatch.fixes.topology import Topology
from gradwatch.layers import ROOT_NAME, activation_kind, named_modules, unwrap_model

log = logging.getLogger(__name__)

#: Model inputs for one forward pass: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
ExampleInput = torch.Tensor | tuple | list | dict | None


def call_model(model: nn.Module, example_input: ExampleInput) -> Any:
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, tuple | list):
        return model(*example_input)
    return model(example_input)


def number_option(label: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    """A fix option that must be a number (not a bool) in an interval, as a float.

    Raises:
        ValueError: naming ``label`` (``"fix: option"``), the value and the interval.
    """
    inside = isinstance(value, int | float) and not isinstance(value, bool) and \
        (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{label}={value!r}; allowed: a number in {interval}")
    return float(value)


@dataclass(frozen=True)
class Applicability:
    """Whether a fix applies; falsy with ``reason`` saying why not."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class Plan:
    """What a fix would do; built without changing anything.

    Attributes:
        targets: original names of the modules the fix acts on.
        refused: ``{name: reason}`` for named modules it cannot act on.
        reason: why it applies, or (when ``targets`` is empty) why it does not.
        ops: structural operations (empty for in-place fixes).
        code: copy-pasteable Python; imports: the imports it needs.
        details: numbers for the report.
        recommend_only: advice, nothing to execute (``lower_lr``).
        private: values for ``execute`` that do not belong in the report.
    """

    targets: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    ops: list[dict[str, Any]] = field(default_factory=list)
    code: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    recommend_only: bool = False
    private: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.targets) or self.recommend_only

    def refusals(self, when_none: str = "the finding names no layers") -> str:
        """Why each named module was refused, for the reason of a plan with no target."""
        return "; ".join(f"{n}: {r}" for n, r in self.refused.items()) or when_none


class FixContext:
    """The model and what is known about it, shared by the fixes of one ``apply_fixes`` call.

    Args:
        model: the model to fix (``torch.compile`` / DDP wrappers are looked through).
        structure: ``Diagnosis.structure`` (may be empty).
        optimizer: the optimizer to keep in sync, if any.
        example_input: model inputs for one batch, used by fixes that can use live statistics
            (``insert_batchnorm`` initialises from them).
    """

    def __init__(
        self,
        model: nn.Module,
        structure: dict[str, Any] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        example_input: ExampleInput = None,
    ):
        self.wrapped = model
        self.model = unwrap_model(model)
        self.structure = dict(structure or {})
        self.optimizer = optimizer
        self.example_input = example_input
        #: Modules as they were when the context was made, by original name (wrapper segments such as
        #: ``_orig_mod`` left out, as layer names spell them; a wrapped module wins over its wrapper).
        self.modules: dict[str, nn.Module] = {(n or ROOT_NAME): m for n, m in named_modules(self.model)}
        self.topology = Topology(self.modules, self.structure)
        self._paths: dict[str, str] = {n: n for n in self.modules}
        self._kind_override: dict[str, str | None] = {}
        #: ``(fix name, original module name)`` pairs already handled in this context.
        self.done: set[tuple[str, str]] = set()
        self.clippers: list[Any] = []

    @property
    def distributed(self) -> bool:
        return self.wrapped is not self.model and isinstance(
            self.wrapped, nn.parallel.DistributedDataParallel | nn.DataParallel
        )

    def path(self, name: str) -> str:
        """Where the module originally named ``name`` is now (it may have moved into a wrapper)."""
        return self._paths.get(name, name)

    def moved(self, renames: dict[str, str]) -> None:
        """Record that modules moved (``{old path: new path}``), including their descendants."""
        for old, new in renames.items():
            for original, current in self._paths.items():
                self._paths[original] = paths.renamed(current, old, new)

    def activation_kind(self, name: str) -> str | None:
        """``"relu" | "leaky" | "sigmoid" | "tanh" | "hard"`` of the activation originally named ``name``,
        taking swaps made (or planned, in a dry run) in this context into account."""
        if name in self._kind_override:
            return self._kind_override[name]
        return activation_kind(self.modules[name]) if name in self.modules else None

    def swapped(self, name: str, kind: str | None) -> None:
        self._kind_override[name] = kind

    def current_module(self, name: str) -> nn.Module | None:
        """The module now at the original name's current path (``None`` if not there, e.g. in a dry run)."""
        try:
            return paths.get_module(self.model, self.path(name))
        except LookupError:
            return None


class Fix(FixFacts, ABC):
    """Base class of every fix; subclasses register with :func:`~gradwatch.fixes.registry.register_fix`.

    Subclasses declare their facts as class attributes (:class:`~gradwatch.fixes.facts.FixFacts`:
    ``name``, ``effect``, ``kinds``, ``why``, ``opt_in``, ``preflight``, ``caps_gradients``),
    validate their options in ``__init__`` (unknown options are an error), and implement
    :meth:`plan`; fixes that are not structural also implement :meth:`execute`.
    """

    def options(self) -> dict[str, Any]:
        """The fix's options, as plain data (for the report)."""
        return {}

    @abstractmethod
    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        """What the fix would do for ``finding`` (or for the explicit ``targets``); changes nothing.

        Called only for findings of a kind the fix treats (``kinds``): :meth:`planned` refuses the others.
        """

    def planned(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        """:meth:`plan`, behind the check every fix shares: a finding of another kind is refused."""
        if finding.kind not in self.kinds:
            return Plan(reason=self.why_not.get(finding.kind)
                        or f"{self.name} treats {self.kinds} findings, not {finding.kind!r}")
        return self.plan(ctx, finding, targets)

    def untreated_modules(
        self, ctx: FixContext, names: Sequence[str], plan: Plan, already: str
    ) -> Iterator[tuple[str, nn.Module]]:
        """``(name, module)`` for the named modules that exist and this fix has not handled yet in ``ctx``;
        the others are refused on ``plan`` (``already`` says why for those handled before)."""
        for name in names:
            module = ctx.modules.get(name)
            if module is None:
                plan.refused[name] = "no module of that name in the model"
            elif (self.name, name) in ctx.done:
                plan.refused[name] = already
            else:
                yield name, module

    def module_now(self, ctx: FixContext, name: str) -> nn.Module:
        """The module the plan named ``name``, where it is now (the plan checked that it exists)."""
        module = ctx.current_module(name)
        if module is None:  # pragma: no cover - plan checked it exists
            raise LookupError(f"{self.name}: {name!r} vanished from the model")
        return module

    def applies(self, ctx: FixContext, finding: Finding) -> Applicability:
        """Whether the fix can act on ``finding``; the reason says why not when it cannot."""
        plan = self.planned(ctx, finding)
        return Applicability(plan.ok, plan.reason)

    def code(self, ctx: FixContext, finding: Finding) -> list[str]:
        """Copy-pasteable Python doing the fix on the user's own ``model`` (empty if it does not apply,
        unless the fix has advice to give as code, like clipping without an optimizer)."""
        plan = self.planned(ctx, finding)
        return plan.imports + plan.code if plan.code else []

    def execute(self, ctx: FixContext, plan: Plan, change: Change) -> None:
        """In-place work of a non-structural fix (re-init, installing a clipper). Default: nothing."""
        return None

    def prepare(self, ctx: FixContext, plan: Plan) -> Any:
        """Measure what the structural change needs before the tree changes (default: nothing)."""
        return None

    def finish(self, ctx: FixContext, plan: Plan, created: list[dict[str, Any]], prepared: Any, change: Change) -> None:
        """Adjust modules a structural change created (e.g. initialise them); default: nothing."""
        return None

    def commit(self, ctx: FixContext, plan: Plan) -> None:
        """Tell ``ctx`` what changed (moved modules, swapped kinds); also called for a dry run."""
        for target in plan.targets:
            ctx.done.add((self.name, target))

    def apply(
        self,
        ctx: FixContext,
        finding: Finding,
        *,
        targets: Sequence[str] | None = None,
        dry_run: bool = False,
    ) -> Change:
        """Plan and (unless ``dry_run``) execute the fix; returns the :class:`Change` saying what changed.

        A refusal (``status="refused"``) changes nothing. Structural fixes refuse a model wrapped
        in DistributedDataParallel (the wrapper would not see new parameters: apply them before
        wrapping).
        """
        plan = self.planned(ctx, finding, targets)
        change = Change(
            fix=self.name,
            finding=finding.kind,
            reason=plan.reason,
            targets=list(plan.targets),
            refused=dict(plan.refused),
            structural=self.structural,
            code=list(plan.code),
            imports=list(plan.imports),
            details={"options": self.options(), **plan.details},
        )
        if not plan.ok:
            change.status = "refused"
            change.reason = plan.reason
            return change
        if self.structural and ctx.distributed and not dry_run:
            change.status = "refused"
            change.reason = (
                f"the model is wrapped in {type(ctx.wrapped).__name__}: structural changes would not be seen by the "
                "wrapper; apply them before wrapping (e.g. in a preflight step)"
            )
            return change
        if plan.recommend_only:
            change.status = "recommended"
            self.commit(ctx, plan)
            return change
        if dry_run:
            change.status = "planned"
            for op in plan.ops:  # later fixes' code must address modules where this one moves them
                ctx.moved(ops_mod.renames_of(op))
            self.commit(ctx, plan)
            return change
        if self.structural:
            self._execute_structural(ctx, plan, change)
        else:
            self.execute(ctx, plan, change)
        if not self.structural:
            change.layers = [ctx.path(t) for t in plan.targets]
        self.commit(ctx, plan)
        log.info("gradwatch: %s", change.summary())
        return change

    def _execute_structural(self, ctx: FixContext, plan: Plan, change: Change) -> None:
        model = ctx.model
        before_params = {id(p): (n, p) for n, p in model.named_parameters()}
        sources: dict[str, list[torch.Tensor]] = {}
        for op in plan.ops:
            module = paths.get_module(model, op["path"])
            change.before[op["path"]] = _describe(module)
            sources[op["path"]] = list(module.parameters())
        prepared = self.prepare(ctx, plan)
        created: list[dict[str, Any]] = []
        ops = [dict(op) for op in plan.ops]
        for op in ops:
            ops_mod.validate(op)
        undo = ops_mod.Undo()
        try:
            for op in ops:
                created.append({"op": op, **ops_mod.apply(model, op, undo)})
            self.finish(ctx, plan, created, prepared, change)
        except Exception:
            undo.revert()
            raise
        for item in created:
            ctx.moved(item["renames"])
        change.ops = ops
        for op in ops:
            change.after[op["path"]] = _describe(paths.get_module(model, op["path"]))
        change.layers = [ctx.path(t) for t in plan.targets]
        after_params = {id(p): (n, p) for n, p in model.named_parameters()}
        added = [after_params[i] for i in after_params if i not in before_params]
        removed = [before_params[i] for i in before_params if i not in after_params]
        change.params_added = [n for n, _ in added]
        change.params_removed = [n for n, _ in removed]
        change.optimizer = self._sync_optimizer(ctx, created, sources, added, removed)

    @staticmethod
    def _sync_optimizer(
        ctx: FixContext,
        created: list[dict[str, Any]],
        sources: dict[str, list[torch.Tensor]],
        added: list[tuple[str, nn.Parameter]],
        removed: list[tuple[str, nn.Parameter]],
    ) -> str:
        if not added and not removed:
            return "n/a: no parameters added or removed"
        if ctx.optimizer is None:
            return (
                f"rebuild required: {len(added)} parameters added and {len(removed)} removed, and no optimizer was "
                "given; build the optimizer after applying fixes (or pass optimizer=...)"
            )
        names = {id(p): n for n, p in added}
        # One new group per source group: new parameters take the hyperparameters of the group
        # holding the layer they replace or wrap.
        buckets: dict[int | None, tuple[list[nn.Parameter], list[torch.Tensor]]] = {}
        for item in created:
            new_params = [p for p in item["new"].parameters() if id(p) in names]
            if not new_params:
                continue
            source = sources.get(item["op"]["path"], [])
            if source and not any(s.requires_grad for s in source):
                for p in new_params:  # the replaced layer was frozen: so is what replaces it
                    p.requires_grad_(False)
            indices = (optim_mod.group_index(ctx.optimizer, t) for t in source)
            index = next((i for i in indices if i is not None), None)
            bucket = buckets.setdefault(index, ([], []))
            bucket[0].extend(new_params)
            bucket[1].extend(source)
        lines = []
        for index, (new_params, source) in buckets.items():
            if index is None:
                lines.append(f"{len(new_params)} not added (the layers they replace or wrap were not in the optimizer)")
                continue
            new_index = optim_mod.add_params(ctx.optimizer, new_params, [names[id(p)] for p in new_params], source)
            lines.append(f"{len(new_params)} added as group {new_index} (hyperparameters of group {index})")
        n_removed = optim_mod.remove_params(ctx.optimizer, [p for _, p in removed])
        if n_removed:
            lines.append(f"{n_removed} removed with their state")
        return "updated: " + "; ".join(lines) if lines else "n/a"


def _describe(module: nn.Module) -> str:
    text = repr(module)
    return text if len(text) <= 400 else text[:397] + "..."


def target_layers(finding: Finding) -> list[str]:
    """The parameter layers a finding's fixes treat: ``evidence["fix_layers"]`` when the diagnosis
    names the cause's layers (every under-/over-scaled layer, or the whole decaying chain up to the
    output layer), else ``finding.layers`` for vanishing/exploding/nonfinite and
    ``evidence["feeding_layers"]`` for dead_units/saturation (whose ``layers`` are activations)."""
    if finding.evidence.get("fix_layers"):
        return [str(n) for n in finding.evidence["fix_layers"]]
    if finding.kind in ("dead_units", "saturation"):
        return [str(n) for n in finding.evidence.get("feeding_layers", ())]
    return list(finding.layers)
