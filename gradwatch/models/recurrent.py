"""Recurrent networks: vanishing through time (tanh RNN), exploding through time under SGD and under Adam.

Every network is a :class:`RecurrentClassifier`: one recurrent layer ``rnn`` read out by ``head``.
Vanishing *through time* does not show in parameter gradients; measure it with
:func:`gradwatch.models.hidden_grad_norms_per_step`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradwatch import tasks
from gradwatch.models.case import OptimizerFactory
from gradwatch.models.recipe import Setup, adam, seeded, sgd
from gradwatch.models.registry import register_twins


class RecurrentClassifier(nn.Module):
    """One recurrent layer (``self.rnn``, batch first) read out from its last time step by ``head``.

    Per-time-step hidden states: ``self.rnn(x)[0]`` is ``(batch, time, hidden)``, but gradients
    taken with respect to that output tensor only see the *direct* path from each ``h_t`` to the
    loss — here zero for every ``t`` before the last — because the recurrence runs inside one
    fused op. Gradients *through time* need the states as separate graph nodes: see
    :func:`~gradwatch.models.hidden_grad_norms_per_step`, or take the gradient with respect to the
    input sequence (``dL/dx_t`` includes every path through later steps).
    """

    def __init__(self, rnn: nn.RNNBase, classes: int):
        super().__init__()
        if not rnn.batch_first or rnn.bidirectional:
            raise ValueError("RecurrentClassifier needs a unidirectional, batch_first recurrent layer")
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, classes)

    def forward(self, x: Tensor) -> Tensor:
        outputs, _ = self.rnn(x)
        return self.head(outputs[:, -1])


RNN_HIDDEN = 32


# ----------------------------------------------------------------------------------------------
# Vanilla RNN on a long-range task: vanishing through time

RNN_LENGTH = 50
GRU_UPDATE_BIAS = 3.0


def _vanilla_rnn(seed: int, fixed: bool) -> Setup:
    if fixed:
        rnn: nn.RNNBase = nn.GRU(1, RNN_HIDDEN, batch_first=True)
        with torch.no_grad():  # gates are ordered (reset, update, new): bias the update gate to keep
            rnn.bias_ih_l0[RNN_HIDDEN : 2 * RNN_HIDDEN].fill_(GRU_UPDATE_BIAS)
            rnn.bias_hh_l0[RNN_HIDDEN : 2 * RNN_HIDDEN].zero_()
    else:
        rnn = nn.RNN(1, RNN_HIDDEN, batch_first=True)
    data = tasks.first_token_sequences(seeded(seed), length=RNN_LENGTH)
    return Setup(RecurrentClassifier(rnn, 2), data, adam(3e-3), batch_size=64, default_steps=200)


vanilla_rnn, vanilla_rnn_fixed = register_twins(
    "vanilla_rnn", _vanilla_rnn, problem="vanishing", cure=("lstm_gru",),
    summaries=("Vanishing through time: a tanh ``nn.RNN`` on a 50-step recall task (cure: lstm_gru).",
               "Twin of ``vanilla_rnn``: an ``nn.GRU`` of the same sizes, update gate biased to keep."),
    description=(
        f"Vanishing gradients through time in a tanh nn.RNN (hidden {RNN_HIDDEN}, default "
        f"init) that must report the sign written at t=0 of a {RNN_LENGTH}-step noisy sequence. "
        f"The gradient reaching h_t is multiplied at every step back by W_hh^T diag(1 - h^2), "
        f"whose gain is < 1, so ||dL/dh_0|| is ~1e-11 of ||dL/dh_T||: the weights never learn "
        f"to keep the first token and the loss stays at chance. Parameter gradients do not "
        f"show it (weight_hh's gradient is a sum over steps): use hidden_grad_norms_per_step(). "
        f"Cure: lstm_gru, a gated cell whose state is carried additively; its gate starts "
        f"biased towards keeping the state, the usual initialisation for gated cells."
    ),
    fixed_description=(
        f"Fixed twin of vanilla_rnn: an nn.GRU of the same sizes. Its state update is "
        f"h_t = (1 - z) * n + z * h_(t-1); the update gate's bias starts at {GRU_UPDATE_BIAS} "
        f"(z ~ 0.95), so the state, and the gradient, survive ~20 steps at initialisation and "
        f"training can open the path to t=0 (the analogue of an LSTM's forget-gate bias)."
    ),
)


# ----------------------------------------------------------------------------------------------
# RNNs with over-scaled recurrent weights: exploding, cured by clipping under SGD and by an
# orthogonal re-initialisation under Adam

EXPLODING_GAIN = 2.5
EXPLODING_CLIP = 1.0
EXPLODING_LENGTH = 50
EXPLODING_LR = 0.1
RECURRENT_ADAM_GAIN = 2.5


def _recent_token_rnn(seed: int, optimizer: OptimizerFactory, *, gain: float | None, clip: float | None = None) -> Setup:
    """A tanh RNN on the lag-1 recall task; ``W_hh`` has spectral radius ~``gain`` (orthogonal if ``None``)."""
    rnn = nn.RNN(4, RNN_HIDDEN, batch_first=True)
    with torch.no_grad():
        if gain is None:
            nn.init.orthogonal_(rnn.weight_hh_l0)
        else:  # a random matrix with entries N(0, g^2/H) has spectral radius ~g
            nn.init.normal_(rnn.weight_hh_l0, std=gain / math.sqrt(RNN_HIDDEN))
    data = tasks.recent_token_sequences(seeded(seed), length=EXPLODING_LENGTH, lag=1)
    return Setup(RecurrentClassifier(rnn, 4), data, optimizer, batch_size=64, default_steps=200, clip_grad_norm=clip)


def _exploding_rnn(seed: int, fixed: bool) -> Setup:
    return _recent_token_rnn(seed, sgd(EXPLODING_LR), gain=EXPLODING_GAIN, clip=EXPLODING_CLIP if fixed else None)


exploding_rnn, exploding_rnn_fixed = register_twins(
    "exploding_rnn", _exploding_rnn, problem="exploding", cure=("clip_gradients",),
    summaries=("Exploding: a tanh ``nn.RNN`` with recurrent gain 2.5, trained with SGD (cure: clip_gradients).",
               "Twin of ``exploding_rnn``: the same model trained with gradient-norm clipping."),
    description=(
        f"Exploding gradients in a tanh nn.RNN (hidden {RNN_HIDDEN}) whose recurrent weights are "
        f"drawn N(0, g^2/hidden) with gain g = {EXPLODING_GAIN} (spectral radius ~g), trained "
        f"with SGD on a short-memory task: name the token one step before the last of a "
        f"{EXPLODING_LENGTH}-step sequence. With a gain above 1 the dynamics are chaotic and the "
        f"gradient grows at every step back in time (||dL/dh_0|| ~1e4-1e5 x ||dL/dh_T||); the "
        f"recurrent layer's gradient is hundreds of times its weights' norm, so the first SGD "
        f"updates throw the weights so far that the tanh units saturate for good and the loss "
        f"ends near or above chance. The explosion is visible in the first few steps; after the "
        f"wreck the saturated layer passes almost no gradient. Cure: clip_gradients (global "
        f"norm {EXPLODING_CLIP}): every update stays bounded, training shrinks the recurrent "
        f"gain, and the raw gradients calm down within a few dozen steps. (Clipping caps large "
        f"gradients; it never lifts vanishing ones.)"
    ),
    fixed_description=(
        f"Fixed twin of exploding_rnn: the same model, data and optimizer, trained with the "
        f"global gradient norm clipped to {EXPLODING_CLIP} (case.clip_grad_norm; train() clips "
        f"after on_backward, so observers see the unclipped gradients)."
    ),
)


def _recurrent_adam(seed: int, fixed: bool) -> Setup:
    return _recent_token_rnn(seed, adam(3e-3), gain=None if fixed else RECURRENT_ADAM_GAIN)


recurrent_adam, recurrent_adam_fixed = register_twins(
    "recurrent_adam", _recurrent_adam, problem="exploding", cure=("recurrent_init",),
    summaries=("Exploding: a tanh ``nn.RNN`` with recurrent gain 2.5, trained with Adam (cure: recurrent_init).",
               "Twin of ``recurrent_adam``: an orthogonal recurrent matrix."),
    description=(
        f"exploding_rnn's over-scaled recurrence (spectral radius ~{RECURRENT_ADAM_GAIN}) under Adam. "
        f"Adam divides each gradient by its running scale, so clipping changes nothing (measured: "
        f"the loss ends higher with it): the recurrent matrix stays chaotic and the loss stays near "
        f"chance. Cure: recurrent_init, an orthogonal W_hh (spectral radius 1; Saxe et al. 2014)."
    ),
    fixed_description="Fixed twin of recurrent_adam: the same RNN with an orthogonal W_hh, trained with Adam.",
)
