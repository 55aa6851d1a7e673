"""Plain MLPs: vanishing (sigmoid, tiny tanh init), exploding (over-scaled ReLU), dead units,
saturation, a gradient spike, and a healthy control.

Every network is :func:`mlp` with readable layer names (``fc1, act1, ..., head``); a twin whose cure
keeps the parameters (``he_init``, ``swap_activation``, ``clip_gradients``) has exactly its problem
model's parameter names and shapes.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from gradwatch.models.case import ReferenceCase
from gradwatch.models.recipe import (
    Setup,
    adam,
    he,
    hidden,
    init_layers,
    normal,
    seeded,
    sgd,
    teacher_setup,
    xavier,
)
from gradwatch.models.registry import register_model, register_twins


def mlp(
    in_features: int, width: int, depth: int, out_features: int, activation: type[nn.Module]
) -> nn.Sequential:
    """``depth`` hidden ``Linear`` + activation pairs and a linear ``head``, as a named Sequential.

    Names are ``fc1, act1, ..., fc{depth}, act{depth}, head``: stable across seeds and twins,
    and each activation is a module, so hooks can see it and fixes can swap it.
    """
    layers: list[tuple[str, nn.Module]] = []
    features = in_features
    for i in range(1, depth + 1):
        layers += [(f"fc{i}", nn.Linear(features, width)), (f"act{i}", activation())]
        features = width
    layers.append(("head", nn.Linear(features, out_features)))
    return nn.Sequential(OrderedDict(layers))


# ----------------------------------------------------------------------------------------------
# Deep sigmoid MLP: vanishing

SIGMOID_MLP_DEPTH = 10
SIGMOID_MLP_WIDTH = 64


def _sigmoid_mlp(seed: int, fixed: bool) -> Setup:
    model = mlp(16, SIGMOID_MLP_WIDTH, SIGMOID_MLP_DEPTH, 4, nn.ReLU if fixed else nn.Sigmoid)
    if fixed:  # the problem keeps PyTorch's default init
        init_layers(model, he, hidden(SIGMOID_MLP_DEPTH))
    return teacher_setup(model, seed, sgd(0.02))


sigmoid_mlp, sigmoid_mlp_fixed = register_twins(
    "sigmoid_mlp", _sigmoid_mlp, problem="vanishing", cure=("swap_activation", "he_init"),
    summaries=("Vanishing: a 10-layer sigmoid MLP with default init (cure: swap_activation + he_init).",
               "Twin of ``sigmoid_mlp``: ReLU activations and Kaiming init."),
    description=(
        "Vanishing gradients in a deep sigmoid MLP (10 hidden Linear+Sigmoid layers, PyTorch "
        "default init, SGD). Backpropagation multiplies by sigmoid'(z) <= 0.25 and by a default-"
        "initialised weight matrix (gain ~0.6) at every layer, so the gradient shrinks ~7x per "
        "layer: the first layer's gradient is ~1e-9-1e-8 of the head's and the early layers never "
        "learn; the loss stays at chance. Cure: swap_activation (ReLU, derivative 1 where "
        "active) + he_init (Kaiming weights keep the signal's scale through ReLUs)."
    ),
    fixed_description=(
        "Fixed twin of sigmoid_mlp: same depth, width, data and optimizer, with ReLU activations "
        "and Kaiming-normal weights (zero biases), which is what swap_activation + he_init make "
        "of it. Gradients reach the first layer at a similar scale as the head."
    ),
)


# ----------------------------------------------------------------------------------------------
# Deep tanh MLP with a tiny initialisation: vanishing

TANH_DEPTH = 10
TANH_TINY_STD = 0.02


def _tanh_tiny_init(seed: int, fixed: bool) -> Setup:
    model = mlp(16, 32, TANH_DEPTH, 4, nn.Tanh)
    init = xavier(nn.init.calculate_gain("tanh")) if fixed else normal(TANH_TINY_STD)
    init_layers(model, init, hidden(TANH_DEPTH))
    return teacher_setup(model, seed, sgd(0.02))


tanh_tiny_init, tanh_tiny_init_fixed = register_twins(
    "tanh_tiny_init", _tanh_tiny_init, problem="vanishing", cure=("he_init",),
    summaries=("Vanishing: a 10-layer tanh MLP initialised with std 0.02 (cure: he_init, i.e. Xavier for tanh).",
               "Twin of ``tanh_tiny_init``: Xavier init (gain 5/3), tanh kept."),
    description=(
        f"Vanishing gradients in a deep tanh MLP (10 hidden layers) whose weights start at "
        f"std {TANH_TINY_STD}. Around zero tanh is linear, so each layer scales both the forward "
        f"signal and the backward gradient by ~std*sqrt(width) ~ 0.1: the input is gone after "
        f"a few layers and the early layers' gradients (visible through their biases) are "
        f"~1e-8 of the late ones'. Weight-gradient norms alone look flat (each is a small "
        f"gradient times a small activation); the decay shows in per-layer norms including "
        f"biases and in activation gradients. Cure: he_init, which for tanh-fed layers means "
        f"Xavier init with gain 5/3, so the signal keeps its scale."
    ),
    fixed_description=(
        "Fixed twin of tanh_tiny_init: the same tanh MLP with Xavier-normal weights (gain 5/3, "
        "zero biases), what he_init does to tanh-fed layers when the activation is kept."
    ),
)


# ----------------------------------------------------------------------------------------------
# Deep ReLU MLP with over-scaled weights, trained with Adam: exploding

OVERSCALED_DEPTH = 8
OVERSCALE = 3.0


def _overscaled_relu_mlp(seed: int, fixed: bool) -> Setup:
    model = mlp(16, 64, OVERSCALED_DEPTH, 4, nn.ReLU)
    names = hidden(OVERSCALED_DEPTH)
    init_layers(model, he, names)
    with torch.no_grad():
        for layer in names:
            model.get_submodule(layer).weight.mul_(1.0 if fixed else OVERSCALE)
    return teacher_setup(model, seed, adam(1e-3))


overscaled_relu_mlp, overscaled_relu_mlp_fixed = register_twins(
    "overscaled_relu_mlp", _overscaled_relu_mlp, problem="exploding", cure=("he_init",),
    summaries=("Exploding: an 8-layer ReLU MLP at 3x He scale, trained with Adam (cure: he_init).",
               "Twin of ``overscaled_relu_mlp``: He init."),
    description=(
        f"Exploding gradients in a deep ReLU MLP ({OVERSCALED_DEPTH} hidden layers) whose "
        f"weights are {OVERSCALE:g}x the He scale, trained with Adam. ReLU is positively "
        f"homogeneous, so the forward signal grows {OVERSCALE:g}x per layer (logits ~1e3-1e4) "
        f"and so does the gradient going back; each weight gradient is the product of the two, "
        f"so it is huge (10-60x the weight's norm in every hidden layer, ~1e4x in the head) but "
        f"roughly flat across depth: "
        f"a growth-across-depth rule misses it. The loss is in the tens to hundreds. Clipping "
        f"is no cure: Adam divides each gradient by its own running scale, so its updates are "
        f"~lr in size whatever the gradient's, and 1e-3 per step cannot undo a {OVERSCALE:g}x "
        f"scale in {OVERSCALED_DEPTH} layers within a few hundred steps (clipped to norm 1, the "
        f"loss still ends in the tens). Cure: he_init (Kaiming weights, zero biases)."
    ),
    fixed_description=(
        "Fixed twin of overscaled_relu_mlp: the same MLP, data and Adam optimizer with "
        "Kaiming-normal weights (zero biases), what he_init makes of it."
    ),
)


# ----------------------------------------------------------------------------------------------
# ReLU MLP with dead units, and the healthy shallow control of the same recipe

DEAD_BIAS = -4.0


def _relu_mlp(seed: int, depth: int, first_bias: float) -> Setup:
    model = mlp(16, 64, depth, 4, nn.ReLU)
    init_layers(model, he, hidden(depth))
    with torch.no_grad():
        model.get_submodule("fc1").bias.fill_(first_bias)
    return teacher_setup(model, seed, sgd(0.02))


def _dead_relu_mlp(seed: int, fixed: bool) -> Setup:
    return _relu_mlp(seed, 3, 0.0 if fixed else DEAD_BIAS)


dead_relu_mlp, dead_relu_mlp_fixed = register_twins(
    "dead_relu_mlp", _dead_relu_mlp, problem="dead_units", cure=("he_init",),
    summaries=("Dead units: a ReLU MLP whose first layer has biases of -4 (cure: he_init).",
               "Twin of ``dead_relu_mlp``: the same weights, biases zeroed."),
    description=(
        f"Dead ReLU units: a 3-hidden-layer ReLU MLP (Kaiming weights) whose first layer's "
        f"biases are {DEAD_BIAS:g}, as a too-large learning-rate step can leave them. Its "
        f"pre-activations have std ~1.4, so ~85% of fc1's units are negative for every example "
        f"of a batch: they output 0, pass no gradient, and cannot recover. The few live units "
        f"fire rarely, so the network starves and the loss stays near chance. Cure: he_init "
        f"of the dead layer (Kaiming weights, zero biases); LeakyReLU would also keep a "
        f"gradient alive, but a 0.01 slope under a -4 bias recovers slowly."
    ),
    fixed_description=(
        "Fixed twin of dead_relu_mlp: the same weights with fc1's biases zeroed "
        "(Kaiming-initialised as he_init leaves it): about half of each unit's inputs activate it."
    ),
)


@register_model
def shallow_relu_mlp(seed: int = 0) -> ReferenceCase:
    """Healthy control: a 2-hidden-layer ReLU MLP with He init."""
    return _relu_mlp(seed, 2, 0.0).case(
        "shallow_relu_mlp", seed, problem=None, twin=None, cure=(),
        description=(
            "Healthy control: a 2-hidden-layer ReLU MLP with Kaiming init and SGD. Shallow and "
            "well scaled: no problem to find."
        ),
    )


# ----------------------------------------------------------------------------------------------
# Sigmoid network with large weights: saturation

SATURATED_GAIN = 30.0


def _saturated_sigmoid(seed: int, fixed: bool) -> Setup:
    model = mlp(16, 32, 1, 4, nn.Sigmoid)
    init_layers(model, xavier(1.0 if fixed else SATURATED_GAIN), ["fc1"])
    return teacher_setup(model, seed, sgd(0.1))


saturated_sigmoid, saturated_sigmoid_fixed = register_twins(
    "saturated_sigmoid", _saturated_sigmoid, problem="saturation", cure=("he_init",),
    summaries=("Saturation: a sigmoid MLP with weights 30x the Xavier scale (cure: he_init, i.e. Xavier).",
               "Twin of ``saturated_sigmoid``: Xavier init."),
    description=(
        f"Saturated sigmoids: a sigmoid MLP with one hidden layer whose weights are "
        f"{SATURATED_GAIN:g}x the Xavier scale. Pre-activations have std ~25, so over 80% of "
        f"sigmoid outputs are within 0.01 of 0 or 1, where sigmoid' < 0.01: those units are "
        f"stuck, the hidden layer acts as fixed random binary features and the loss stays far "
        f"above the twin's. Deliberately shallow (fc1 and head), so there is no depth for a "
        f"gradient to vanish across: the problem is the saturation itself. Cure: he_init, "
        f"which for a sigmoid-fed layer means Xavier init (gain 1, zero biases); swapping to "
        f"ReLU alone would leave the weights {SATURATED_GAIN:g}x too large."
    ),
    fixed_description=(
        "Fixed twin of saturated_sigmoid: the same sigmoid MLP with Xavier-normal weights "
        "(zero biases), what he_init does to a sigmoid-fed layer: pre-activations of std ~0.7, "
        "no unit saturated."
    ),
)


# ----------------------------------------------------------------------------------------------
# Gradient spikes: one corrupt batch per epoch

SPIKE_BAD_BATCH = 100  # of 128 per epoch: the spikes hit steps 100 and 228 of the 240


def _spike_mlp(seed: int, fixed: bool) -> Setup:
    g = seeded(seed)
    inputs = torch.randn(4096, 16, generator=g)
    targets = torch.tanh(inputs @ torch.randn(16, 4, generator=g) / 4)
    bad = slice(SPIKE_BAD_BATCH * 32, (SPIKE_BAD_BATCH + 1) * 32)
    targets[bad] *= 30.0  # mislabelled by a unit error upstream: every residual is 30x
    return Setup(mlp(16, 64, 3, 4, nn.Tanh), (inputs, targets), sgd(0.05), batch_size=32, default_steps=240,
                 loss_fn=nn.functional.mse_loss, clip_grad_norm=0.3 if fixed else None)


spike_mlp, spike_mlp_fixed = register_twins(
    "spike_mlp", _spike_mlp, problem="spike", cure=("clip_gradients",),
    summaries=("Gradient spike: one corrupt batch per epoch knocks a healthy tanh regressor off course.",
               "Fixed twin of ``spike_mlp``: global-norm clipping at 0.3 (about 1.4x the typical norm)."),
    description=(
        "Gradient spike: a healthy 3-layer tanh MLP regressing a smooth teacher with SGD (lr 0.05, momentum "
        "0.9), except that one batch per epoch has targets 30x too large. On that step every layer's "
        "gradient norm jumps far above its own recent history and the update throws the model off; the "
        "loss is still high 10 steps later. clip_gradients at the run's own robust bound caps the spike."
    ),
    fixed_description=(
        "spike_mlp with global gradient-norm clipping at 0.3: the corrupt batch moves the weights no "
        "further than a normal one."
    ),
)
