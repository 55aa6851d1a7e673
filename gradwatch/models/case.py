"""The reference case: a model, its synthetic task, its training recipe and what it demonstrates."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradwatch.fixes.registry import list_fixes

#: Problems a reference case can show; ``None`` means a healthy control or a fixed twin.
PROBLEMS: tuple[str, ...] = ("vanishing", "exploding", "dead_units", "saturation", "spike")

#: Suffix of a problem case's fixed twin: ``"sigmoid_mlp"`` -> ``"sigmoid_mlp_fixed"``.
TWIN_SUFFIX = "_fixed"

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ReferenceCase:
    """A model, its synthetic task and training recipe, and what it demonstrates.

    Attributes:
        name: registry name, e.g. ``"sigmoid_mlp"``.
        model: the freshly initialised network (training mode).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``.
        inputs: the whole synthetic training set, first dimension = examples.
        targets: the matching targets.
        optimizer: builds the optimizer from parameters (use :meth:`make_optimizer`).
        batch_size: examples per step; :meth:`batch` walks the data set in order, cycling.
        default_steps: steps after which the problem and its twin are compared.
        problem: ``"vanishing" | "exploding" | "dead_units" | "saturation" | "spike"``, or ``None``.
        twin: the fixed twin's name for a problem case, the problem's name for a twin, else ``None``.
        cure: fix names (see ``gradwatch.fixes.list_fixes()``) that turn the problem into the
            twin; on a twin, the fixes it embodies; empty for healthy controls.
        description: which problem it shows, the mechanism, and which fix cures it.
        seed: the seed the model and data were generated from.
        clip_grad_norm: global gradient-norm threshold applied by :func:`~gradwatch.models.train`
            after the ``on_backward`` hook (so observers see the unclipped gradients), or ``None``.
    """

    name: str
    model: nn.Module = field(repr=False)
    loss_fn: LossFn = field(repr=False)
    inputs: Tensor = field(repr=False)
    targets: Tensor = field(repr=False)
    optimizer: OptimizerFactory = field(repr=False)
    batch_size: int
    default_steps: int
    problem: str | None
    twin: str | None
    cure: tuple[str, ...]
    description: str = field(repr=False)
    seed: int = 0
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.problem is not None and self.problem not in PROBLEMS:
            raise ValueError(f"problem={self.problem!r} is not one of {PROBLEMS} or None")
        unknown = [fix for fix in self.cure if fix not in list_fixes()]
        if unknown:
            raise ValueError(f"unknown fix names {unknown} in cure; allowed: {tuple(list_fixes())}")
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.targets)} targets")
        if not 0 < self.batch_size <= len(self.inputs):
            raise ValueError(f"batch_size={self.batch_size} must be in [1, {len(self.inputs)}]")
        self.cure = tuple(self.cure)

    @property
    def steps_per_epoch(self) -> int:
        """Number of distinct batches; :meth:`batch` repeats with this period."""
        return len(self.inputs) // self.batch_size

    def make_optimizer(self, params: Iterable[nn.Parameter] | None = None) -> torch.optim.Optimizer:
        """The case's optimizer over ``params`` (default: all of ``self.model``'s parameters)."""
        return self.optimizer(self.model.parameters() if params is None else params)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The ``(inputs, targets)`` of training step ``step``: deterministic, no RNG consumed."""
        start = (step % self.steps_per_epoch) * self.batch_size
        return self.inputs[start : start + self.batch_size], self.targets[start : start + self.batch_size]

    def batches(self, steps: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of steps ``start, ..., start + steps - 1``."""
        for step in range(start, start + steps):
            yield self.batch(step)
