"""What a family's builder makes from one seed, and the initialisers and optimizers the families share.

A builder returns a :class:`Setup` (network, data, training recipe); the registry adds what the
case demonstrates (name, problem, twin, cure, description). A problem and its twin are usually
one builder with one switch, so the two differ exactly where the cure acts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradwatch import tasks
from gradwatch.models.case import LossFn, OptimizerFactory, ReferenceCase


@dataclass(frozen=True)
class Setup:
    """A freshly built network, its synthetic data and how to train it.

    Attributes:
        model: the initialised network.
        data: ``(inputs, targets)``, the whole training set.
        optimizer: builds the optimizer from parameters (see :func:`sgd`, :func:`adam`).
        batch_size: examples per step.
        default_steps: steps after which a problem and its twin are compared.
        loss_fn: ``loss_fn(outputs, targets)``. Default: cross-entropy (targets are class indices).
        clip_grad_norm: global gradient-norm threshold applied while training, or ``None``.
    """

    model: nn.Module
    data: tuple[Tensor, Tensor]
    optimizer: OptimizerFactory
    batch_size: int
    default_steps: int
    loss_fn: LossFn = nn.functional.cross_entropy
    clip_grad_norm: float | None = None

    def case(
        self, name: str, seed: int, *, problem: str | None, twin: str | None, cure: tuple[str, ...], description: str
    ) -> ReferenceCase:
        """The :class:`ReferenceCase` named ``name`` that trains this setup."""
        inputs, targets = self.data
        return ReferenceCase(
            name=name, model=self.model, loss_fn=self.loss_fn, inputs=inputs, targets=targets,
            optimizer=self.optimizer, batch_size=self.batch_size, default_steps=self.default_steps,
            problem=problem, twin=twin, cure=cure, description=description, seed=seed,
            clip_grad_norm=self.clip_grad_norm,
        )


def teacher_setup(model: nn.Module, seed: int, optimizer: OptimizerFactory, default_steps: int = 150) -> Setup:
    """The recipe the classifying MLPs share: :func:`gradwatch.tasks.teacher_classification`, batches of 64."""
    return Setup(model, tasks.teacher_classification(seeded(seed)), optimizer, batch_size=64, default_steps=default_steps)


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the data source, so a problem and its twin see the same data."""
    return torch.Generator().manual_seed(seed)


def sgd(lr: float, momentum: float = 0.9) -> OptimizerFactory:
    """SGD with momentum, as a factory of parameters."""
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum)


def adam(lr: float) -> OptimizerFactory:
    """Adam, as a factory of parameters."""
    return functools.partial(torch.optim.Adam, lr=lr)


def hidden(depth: int, prefix: str = "fc") -> list[str]:
    """The hidden layers' names ``fc1, ..., fc{depth}`` of an :func:`~gradwatch.models.mlp`."""
    return [f"{prefix}{i}" for i in range(1, depth + 1)]


def init_layers(model: nn.Module, init: Callable[[nn.Module], None], names: Iterable[str]) -> None:
    """Apply ``init`` to each named submodule of ``model``, outside autograd."""
    with torch.no_grad():
        for name in names:
            init(model.get_submodule(name))


def he(layer: nn.Module) -> None:
    """Kaiming-normal weights (fan-in, ReLU gain) and zero biases: unit variance through ReLUs."""
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def xavier(gain: float) -> Callable[[nn.Module], None]:
    """An initialiser: Xavier-normal weights with ``gain``, zero biases."""

    def init(layer: nn.Module) -> None:
        nn.init.xavier_normal_(layer.weight, gain=gain)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)

    return init


def normal(std: float) -> Callable[[nn.Module], None]:
    """An initialiser: weights drawn from ``N(0, std^2)``, zero biases."""

    def init(layer: nn.Module) -> None:
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)

    return init
