"""Gradients *through time* of a recurrent reference case: what parameter gradients cannot show."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradwatch.models.case import ReferenceCase
from gradwatch.models.recurrent import RecurrentClassifier


def hidden_grad_norms_per_step(case: ReferenceCase, batch: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``||dL/dh_t||`` for every time step ``t`` of a recurrent case: vanishing *through time*.

    Parameter gradients cannot show it (the recurrent weight's gradient is a sum over steps);
    the gradient with respect to each hidden state can. The sequence is re-run one step at a
    time with the state passed explicitly, so every ``h_t`` is a node of the graph and its
    gradient includes all paths through later steps. For an LSTM the state is ``(h_t, c_t)`` and
    both count. The model's ``.grad`` fields are left untouched.

    Args:
        case: a case whose model is a :class:`RecurrentClassifier`.
        batch: ``(inputs, targets)``. Default: ``case.batch(0)``.

    Returns:
        A float tensor of shape ``(time,)``: the norm over batch and hidden units at each step.

    Raises:
        TypeError: if the case's model is not a :class:`RecurrentClassifier` of a plain
            ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM``.
    """
    model = case.model
    if not isinstance(model, RecurrentClassifier):
        raise TypeError(f"{case.name!r} has a {type(model).__name__}, not a RecurrentClassifier")
    if type(model.rnn) not in (nn.RNN, nn.GRU, nn.LSTM):  # a subclass may not carry its state across calls
        raise TypeError(f"cannot re-run a {type(model.rnn).__name__} step by step; supported: RNN, GRU, LSTM")
    inputs, targets = case.batch(0) if batch is None else batch
    state: Tensor | tuple[Tensor, Tensor] | None = None
    states: list[Tensor] = []
    with torch.enable_grad():
        for t in range(inputs.shape[1]):
            _, state = model.rnn(inputs[:, t : t + 1], state)
            states.extend(state if isinstance(state, tuple) else (state,))
        last_hidden = states[-2] if isinstance(state, tuple) else states[-1]  # (layers, batch, hidden)
        loss = case.loss_fn(model.head(last_hidden[-1]), targets)
        grads = torch.autograd.grad(loss, states, allow_unused=True)  # an LSTM's last c_T is unused
    zero = loss.new_zeros(())
    per_state = torch.stack([zero if g is None else g.norm() for g in grads]).view(inputs.shape[1], -1)
    return per_state.norm(dim=1).detach()

