"""The demo's cases: each trained watched before and after gradwatch's fixes, and judged.

:func:`run_case` is the whole before/fix/after sequence of one case (see :mod:`gradwatch.demo`);
:func:`check` is the verdict; :func:`format_loss`, :func:`format_ratio` and :func:`describe` are the
words the verdict and the console share. ``examples/reproduce_table.py`` uses the same functions.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import gradwatch
from gradwatch import models
from gradwatch.findings import Diagnosis
from gradwatch.fixes.record import FixReport

#: The order the problem cases are shown in (the issue's list); cases not named here follow, sorted.
CASE_ORDER: tuple[str, ...] = (
    "sigmoid_mlp", "tanh_tiny_init", "plain_cnn", "vanilla_rnn", "exploding_rnn", "overscaled_relu_mlp",
    "dead_relu_mlp", "saturated_sigmoid",
)

#: How many of the last losses make the smoothed final loss (as ``models.final_loss``).
LOSS_WINDOW = 10

ProgressFn = Callable[[int, float], None]


@dataclass
class RunResult:
    """One watched training run.

    Attributes:
        losses: the loss of every step.
        final_loss: the mean of the last ``LOSS_WINDOW`` losses (``inf`` if one is not finite).
        grad_ratio: gradient norm of the first layer (in forward order) over the last one's,
            medians over the diagnosis window; ``nan`` when there are fewer than two layers.
        diagnosis: the watcher's diagnosis at the end of the run.
        seconds: wall-clock time of the run (training, watching and logging).
        log_dir: where its TensorBoard events went, or ``None``.
    """

    losses: list[float]
    final_loss: float
    grad_ratio: float
    diagnosis: Diagnosis
    seconds: float
    log_dir: str | None = None


@dataclass
class CaseResult:
    """A case's before/after runs, the fixes applied, and whether it behaved.

    Attributes:
        name: the case's registry name.
        problem: the problem it shows (``None`` for healthy controls and twins).
        steps: training steps of each run.
        before: the unfixed run.
        report: what ``apply_fixes`` did (``None`` when nothing was to be fixed).
        after: the run of the fixed model (``None`` when nothing was fixed).
        failures: why the case did not behave (empty: it behaved).
        notes: remarks that are not failures.
    """

    name: str
    problem: str | None
    steps: int
    before: RunResult
    report: FixReport | None = None
    after: RunResult | None = None
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def fixes_applied(self) -> list[str]:
        """Applied fix names in the order applied (a fix applied to several findings counts once)."""
        return list(dict.fromkeys(c.fix for c in self.report.applied)) if self.report is not None else []

    @property
    def loss_ratio(self) -> float:
        """After/before final loss (``nan`` without an after run)."""
        if self.after is None or not self.before.final_loss:
            return math.nan
        return self.after.final_loss / self.before.final_loss


# ----------------------------------------------------------------------------------------------
# Training and checking


def problem_cases() -> list[str]:
    """Registered cases that show a problem, in :data:`CASE_ORDER` (then the others, sorted)."""
    names = [n for n in models.list_models() if models.create(n).problem is not None]
    rank = {n: i for i, n in enumerate(CASE_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def first_last_ratio(diagnosis: Diagnosis) -> float:
    """First layer's median gradient norm over the last layer's, from the diagnosis' layer table."""
    rows = [row for row in diagnosis.layers if row.kind not in ("(total)",)]
    if len(rows) < 2:
        return math.nan
    first, last = rows[0].grad_norm, rows[-1].grad_norm
    if not (math.isfinite(first) and math.isfinite(last)) or last == 0:
        return math.nan
    return first / last


def train_watched(
    case: models.ReferenceCase,
    steps: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    on_step: ProgressFn | None = None,
    histogram_every_n_steps: int = 25,
) -> RunResult:
    """Train ``case.model`` for ``steps`` steps under :func:`gradwatch.watch` and diagnose it.

    The loop is :func:`gradwatch.models.train` (same batches, clipping when the case asks for it),
    with ``watcher.step(loss)`` after each backward through its ``on_loss`` hook. The watcher
    is given the optimizer, so it collects right before each ``optimizer.step()`` (after any
    clipping hook installed earlier by a fix) and knows whether the optimizer is scale-invariant.

    Args:
        case: the reference case (its model is trained in place).
        steps: number of training steps.
        optimizer: the optimizer (default: a new ``case.make_optimizer()``).
        log_dir: TensorBoard directory for this run, or ``None`` for none.
        on_step: called with ``(step, loss)`` once per step, after backward (progress display).
        histogram_every_n_steps: TensorBoard histogram cadence in steps.

    Returns:
        The :class:`RunResult`.
    """
    optimizer = case.make_optimizer() if optimizer is None else optimizer
    start = time.perf_counter()
    watcher = gradwatch.watch(
        case.model, optimizer=optimizer, log_dir=None if log_dir is None else str(log_dir),
        histogram_every_n_steps=histogram_every_n_steps, figure_every_n_steps=0, name=case.name,
    )

    def on_loss(step: int, loss: torch.Tensor) -> None:
        watcher.step(loss)
        if on_step is not None:
            on_step(step, float(loss.detach()))

    try:
        losses = models.train(case, steps, optimizer=optimizer, on_loss=on_loss)
        diagnosis = watcher.diagnose()
    finally:
        watcher.close()
    return RunResult(
        losses=losses, final_loss=models.final_loss(losses, LOSS_WINDOW) if losses else math.nan,
        grad_ratio=first_last_ratio(diagnosis), diagnosis=diagnosis, seconds=time.perf_counter() - start,
        log_dir=None if log_dir is None else str(log_dir),
    )


def check(result: CaseResult) -> list[str]:
    """Why ``result`` did not behave (empty when it did); see the module docstring."""
    failures: list[str] = []
    found = sorted(result.before.diagnosis.kinds())
    if result.problem is None:
        if found:
            failures.append(f"expected no finding, gradwatch reported {found}")
        return failures
    if result.problem not in found:
        failures.append(f"the diagnosis missed the intended '{result.problem}' finding (reported: {found or 'healthy'})")
    extra = [k for k in found if k != result.problem]
    if extra:
        failures.append(f"the diagnosis reported {extra} besides the intended '{result.problem}'")
    if result.report is not None and not result.report.applied:
        refused = [f"{c.fix}: {c.reason}" for c in result.report.changes if c.status == "refused"]
        failures.append("no fix was applied" + (f" (refused: {'; '.join(refused)})" if refused else ""))
    if result.after is not None and result.report is not None and result.report.applied:
        before, after = result.before.final_loss, result.after.final_loss
        if not (after <= 0.5 * before):
            failures.append(
                f"the fixes {result.fixes_applied} did not halve the final loss: {format_loss(before)} -> {format_loss(after)} "
                f"(ratio {format_ratio(after / before if before else math.nan)}) after {result.steps} steps"
            )
    return failures


def run_case(
    name: str,
    *,
    seed: int = 0,
    steps: int | None = None,
    logdir: str | os.PathLike[str] | None = None,
    progress: Callable[[str, int], contextlib.AbstractContextManager[ProgressFn]] | None = None,
) -> CaseResult:
    """Run one case before and after gradwatch's fixes; see the module docstring.

    Args:
        name: a registered case (``models.list_models()``).
        seed: the seed of the model and the data; the fixed model starts from the same state.
        steps: training steps of each run. Default: ``case.default_steps``.
        logdir: TensorBoard root; the runs go to ``<logdir>/<name>/before`` and ``.../after``.
        progress: ``progress(label, total)`` returning a context manager that yields the
            ``on_step`` callback of that run (the console display).

    Returns:
        The :class:`CaseResult`, with ``failures`` filled in by :func:`check`.
    """
    case = models.create(name, seed=seed)
    steps = case.default_steps if steps is None else steps
    run_dir = None if logdir is None else Path(logdir) / name

    def run(c: models.ReferenceCase, phase: str, optimizer: torch.optim.Optimizer | None = None) -> RunResult:
        with (progress(f"{name} {phase}", steps) if progress else contextlib.nullcontext(None)) as on_step:
            return train_watched(c, steps, optimizer=optimizer, log_dir=None if run_dir is None else run_dir / phase,
                                 on_step=on_step)

    before = run(case, "before")
    result = CaseResult(name=name, problem=case.problem, steps=steps, before=before)
    if not before.diagnosis.healthy:
        fixed = models.create(name, seed=seed)  # the same initial weights and data as `before`
        optimizer = fixed.make_optimizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # re-initialising fixes draw from the global RNG
            result.report = gradwatch.apply_fixes(fixed.model, before.diagnosis, optimizer=optimizer)
        if result.report.applied:
            result.after = run(fixed, "after", optimizer)
            if not result.after.diagnosis.healthy:
                result.notes.append(
                    f"after the fixes gradwatch still reports {describe(result.after.diagnosis)}"
                )
    result.failures = check(result)
    return result


# ----------------------------------------------------------------------------------------------
# The words of the verdict


def format_loss(x: float) -> str:
    """A loss for the table: 3 significant digits, ``-`` when not finite."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def format_ratio(x: float) -> str:
    """A ratio for the table: ``0.16``, ``4.1e-09``; ``-`` when not finite."""
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.1e}" if x < 0.01 or x >= 100 else f"{x:.2f}"


def describe(diagnosis: Diagnosis) -> str:
    """``"vanishing (critical), dead_units (warning)"`` or ``"healthy"``."""
    if diagnosis.healthy:
        return "healthy"
    return ", ".join(f"{f.kind} ({f.severity})" for f in diagnosis.findings)

