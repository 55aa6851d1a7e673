"""Reference models: every gradient-flow problem gradwatch diagnoses, and its fixed twin.

Each *reference case* is a small model plus a small synthetic task generated in-process
(:mod:`gradwatch.tasks`, no downloads), an optimizer recipe and a step budget, all a pure
function of one seed. Problem cases show one problem each (``case.problem``); their fixed twin
(``case.twin``) is the same network after the fixes named in ``case.cure`` — the model that
:func:`gradwatch.apply_fixes` should turn the problem into. Healthy controls have neither.
The fixes are demonstrably cures: trained for ``default_steps`` from the same seed, every twin
reaches at most half the final loss of its problem model (``tests/test_models.py`` checks it).

Cases live in a registry, as in timm::

    from gradwatch import models

    models.list_models()                        # sorted names
    case = models.create("sigmoid_mlp", seed=0)  # a ReferenceCase
    losses = models.train(case)                  # plain loop, returns the per-step losses
    twin = models.create(case.twin, seed=0)      # "sigmoid_mlp_fixed"

Add a case with :func:`register_model` on a function ``name(seed) -> ReferenceCase``, or a problem
and its twin at once with :func:`register_twins`.

Layer names are stable and readable (``fc1``, ``act1``, ..., ``head``; ``conv1``, ``bn1``...; ``rnn``,
``head``), and a twin whose cure keeps the parameters (``he_init``, ``swap_activation``,
``clip_gradients``) has exactly the parameter names and shapes of its problem model.

The package: :mod:`~gradwatch.models.case` (the :class:`ReferenceCase`), :mod:`~gradwatch.models.registry`,
:mod:`~gradwatch.models.recipe` (what builders share), :mod:`~gradwatch.models.training`, one module per
family (:mod:`~gradwatch.models.feedforward`, :mod:`~gradwatch.models.compounding`,
:mod:`~gradwatch.models.convolutional`, :mod:`~gradwatch.models.recurrent`, :mod:`~gradwatch.models.attention`),
and :mod:`~gradwatch.models.through_time`. Importing the package registers every family.
"""

from __future__ import annotations

from gradwatch.models.attention import TinyTransformer, transformer_preln
from gradwatch.models.case import PROBLEMS, TWIN_SUFFIX, LossFn, OptimizerFactory, ReferenceCase
from gradwatch.models.compounding import (
    COMPOUND_DEPTH,
    COMPOUND_WIDTH,
    RESIDUAL_BLOCKS,
    RESIDUAL_WIDTH,
    ResidualMLPBlock,
    compound_init_mlp,
    compound_init_mlp_fixed,
    residual_mlp,
    residual_mlp_fixed,
)
from gradwatch.models.convolutional import (
    CNN_CHANNELS,
    CNN_DEPTH,
    BasicBlock,
    plain_cnn,
    plain_cnn_fixed,
    plain_convnet,
    resnet_bn,
)
from gradwatch.models.feedforward import (
    DEAD_BIAS,
    OVERSCALE,
    OVERSCALED_DEPTH,
    SATURATED_GAIN,
    SIGMOID_MLP_DEPTH,
    SIGMOID_MLP_WIDTH,
    SPIKE_BAD_BATCH,
    TANH_DEPTH,
    TANH_TINY_STD,
    dead_relu_mlp,
    dead_relu_mlp_fixed,
    mlp,
    overscaled_relu_mlp,
    overscaled_relu_mlp_fixed,
    saturated_sigmoid,
    saturated_sigmoid_fixed,
    shallow_relu_mlp,
    sigmoid_mlp,
    sigmoid_mlp_fixed,
    spike_mlp,
    spike_mlp_fixed,
    tanh_tiny_init,
    tanh_tiny_init_fixed,
)
from gradwatch.models.recipe import Setup
from gradwatch.models.recurrent import (
    EXPLODING_CLIP,
    EXPLODING_GAIN,
    EXPLODING_LENGTH,
    EXPLODING_LR,
    GRU_UPDATE_BIAS,
    RECURRENT_ADAM_GAIN,
    RNN_HIDDEN,
    RNN_LENGTH,
    RecurrentClassifier,
    exploding_rnn,
    exploding_rnn_fixed,
    recurrent_adam,
    recurrent_adam_fixed,
    vanilla_rnn,
    vanilla_rnn_fixed,
)
from gradwatch.models.registry import create, list_models, register_model, register_twins
from gradwatch.models.through_time import hidden_grad_norms_per_step
from gradwatch.models.training import final_loss, train

__all__ = [
    # the registry and the case
    "PROBLEMS", "TWIN_SUFFIX", "LossFn", "OptimizerFactory", "ReferenceCase", "Setup",
    "create", "list_models", "register_model", "register_twins", "train", "final_loss", "hidden_grad_norms_per_step",
    # building blocks
    "BasicBlock", "RecurrentClassifier", "ResidualMLPBlock", "TinyTransformer", "mlp", "plain_convnet",
    # the cases' constants
    "CNN_CHANNELS", "CNN_DEPTH", "COMPOUND_DEPTH", "COMPOUND_WIDTH", "DEAD_BIAS", "EXPLODING_CLIP", "EXPLODING_GAIN",
    "EXPLODING_LENGTH", "EXPLODING_LR", "GRU_UPDATE_BIAS", "OVERSCALE", "OVERSCALED_DEPTH", "RECURRENT_ADAM_GAIN",
    "RESIDUAL_BLOCKS", "RESIDUAL_WIDTH", "RNN_HIDDEN", "RNN_LENGTH", "SATURATED_GAIN", "SIGMOID_MLP_DEPTH",
    "SIGMOID_MLP_WIDTH", "SPIKE_BAD_BATCH", "TANH_DEPTH", "TANH_TINY_STD",
    # the registered factories
    "compound_init_mlp", "compound_init_mlp_fixed", "dead_relu_mlp", "dead_relu_mlp_fixed", "exploding_rnn",
    "exploding_rnn_fixed", "overscaled_relu_mlp", "overscaled_relu_mlp_fixed", "plain_cnn", "plain_cnn_fixed",
    "recurrent_adam", "recurrent_adam_fixed", "residual_mlp", "residual_mlp_fixed", "resnet_bn", "saturated_sigmoid",
    "saturated_sigmoid_fixed", "shallow_relu_mlp", "sigmoid_mlp", "sigmoid_mlp_fixed", "spike_mlp", "spike_mlp_fixed",
    "tanh_tiny_init", "tanh_tiny_init_fixed", "transformer_preln", "vanilla_rnn", "vanilla_rnn_fixed",
]
