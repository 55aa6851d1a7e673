"""Causes that compound across depth (issue 15): no single layer is far off, their product is.

A ReLU MLP at LeCun scale (each layer 0.71x He) vanishes over 30 layers; un-normalised residual
blocks at He scale explode the forward signal over 16 blocks. (The recurrent case of the same
issue, ``recurrent_adam``, lives with the other recurrent networks.)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradwatch.models.feedforward import mlp
from gradwatch.models.recipe import Setup, adam, he, hidden, init_layers, sgd, teacher_setup
from gradwatch.models.registry import register_twins

# ----------------------------------------------------------------------------------------------
# A deep ReLU MLP a little under He scale: vanishing

COMPOUND_DEPTH = 30
COMPOUND_WIDTH = 256


def _fan_in_normal(variance: float) -> Callable[[nn.Module], None]:
    """An initialiser: weights of variance ``variance / fan_in``, zero biases."""

    def init(layer: nn.Module) -> None:
        nn.init.normal_(layer.weight, std=math.sqrt(variance / layer.in_features))
        nn.init.zeros_(layer.bias)

    return init


def _compound_init_mlp(seed: int, fixed: bool) -> Setup:
    model = mlp(16, COMPOUND_WIDTH, COMPOUND_DEPTH, 4, nn.ReLU)
    init_layers(model, _fan_in_normal(2.0 if fixed else 1.0), hidden(COMPOUND_DEPTH))
    return teacher_setup(model, seed, sgd(0.005), default_steps=200)


compound_init_mlp, compound_init_mlp_fixed = register_twins(
    "compound_init_mlp", _compound_init_mlp, problem="vanishing", cure=("he_init",),
    summaries=("Vanishing: a 30-layer ReLU MLP at LeCun scale, 0.71x He per layer (cure: he_init).",
               "Twin of ``compound_init_mlp``: the hidden layers at He scale."),
    description=(
        f"A compound under-initialisation: a plain ReLU MLP ({COMPOUND_DEPTH} hidden layers, width "
        f"{COMPOUND_WIDTH}) with LeCun-scale weights, std = sqrt(1/fan_in), trained with SGD and "
        f"momentum. Each layer is only 0.71x the He scale, yet a ReLU halves the variance it is "
        f"given, so every layer multiplies the signal's variance by 1/2: 2^-{COMPOUND_DEPTH} over the "
        f"depth, forward and backward. The loss stays at chance. No normalisation or skip is "
        f"missing: re-initialising at He scale alone makes the network train (He et al. 2015). "
        f"Cure: he_init."
    ),
    fixed_description="Fixed twin of compound_init_mlp: the same MLP with Kaiming-normal hidden layers (zero biases).",
)


# ----------------------------------------------------------------------------------------------
# Un-normalised residual blocks at He scale: exploding


class ResidualMLPBlock(nn.Module):
    """``x + fc2(act(fc1(x)))``, no normalisation: the branch of a Fixup/SkipInit-style residual MLP."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


RESIDUAL_BLOCKS = 16
RESIDUAL_WIDTH = 64


def _residual_mlp(seed: int, fixed: bool) -> Setup:
    blocks = [ResidualMLPBlock(RESIDUAL_WIDTH) for _ in range(RESIDUAL_BLOCKS)]
    model = nn.Sequential(OrderedDict(
        [("proj", nn.Linear(16, RESIDUAL_WIDTH))] + [(f"block{i + 1}", b) for i, b in enumerate(blocks)]
        + [("head", nn.Linear(RESIDUAL_WIDTH, 4))]))
    with torch.no_grad():
        for block in blocks:
            he(block.fc1)
            he(block.fc2)
            if fixed:  # every block starts as the identity
                nn.init.zeros_(block.fc2.weight)
    return teacher_setup(model, seed, adam(1e-3))


residual_mlp, residual_mlp_fixed = register_twins(
    "residual_mlp", _residual_mlp, problem="exploding", cure=("rescale_residual",),
    summaries=("Exploding: 16 un-normalised residual blocks with He-scale branches (cure: rescale_residual).",
               "Twin of ``residual_mlp``: the last layer of each branch zero-initialised."),
    description=(
        f"A forward signal that multiplies through residual additions: {RESIDUAL_BLOCKS} blocks "
        f"x + fc2(relu(fc1(x))) (width {RESIDUAL_WIDTH}), no normalisation, both branch layers at He "
        f"scale, trained with Adam. Each block adds a branch as large as twice the stream to it, so "
        f"the stream's variance triples per block (3^{RESIDUAL_BLOCKS} over the stack): logits in the "
        f"thousands, a loss in the thousands at the start and still several times chance at the end "
        f"(with SGD the first step overflows). Every layer is at its textbook scale: he_init cannot "
        f"help. Cure: rescale_residual, zero-initialising the last layer of each branch so every block "
        f"starts as the identity (SkipInit, Fixup)."
    ),
    fixed_description=(
        "Fixed twin of residual_mlp: fc2 of every block zero-initialised (each block starts as the identity)."
    ),
)
