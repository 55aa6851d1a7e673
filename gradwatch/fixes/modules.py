"""The few ``nn.Module`` building blocks structural fixes insert into a model.

They are ordinary, importable modules (``from gradwatch.fixes import Residual``) so that code
snippets can be pasted into the user's own model definition, and so that a fixed model can be
rebuilt by :func:`gradwatch.fixes.replay` and loaded strictly from its ``state_dict``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence


class Residual(nn.Module):
    """``x + alpha * block(x)`` with a learnable scalar ``alpha`` (ReZero / SkipInit).

    ``alpha`` starts at ``0.0`` by default: at insertion the wrapped block is bypassed, so the
    signal and its gradient pass through the skip path unchanged however deep the stack is,
    and the block is learnt back in as ``alpha`` grows (ReZero, Bachlechner et al. 2020;
    SkipInit, De & Smith 2020). Starting at 1 would instead *add* the block's output to its
    input, changing the function just as much while keeping the badly-conditioned path at
    full weight. The block must preserve its input's shape (the fix checks this against the
    observed forward pass before wrapping).

    Args:
        block: the shape-preserving module (or ``nn.Sequential`` of modules) to wrap.
        alpha_init: initial value of ``alpha`` (default ``0.0``).

    Example:
        >>> block = Residual(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
        >>> block(torch.zeros(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, block: nn.Module, alpha_init: float = 0.0):
        super().__init__()
        self.block = block
        ref = next(block.parameters(), None)
        factory = {"dtype": ref.dtype, "device": ref.device} if ref is not None and ref.is_floating_point() else {}
        self.alpha = nn.Parameter(torch.full((), float(alpha_init), **factory))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha * self.block(x)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha.detach()):.4g}"


class ChannelLastBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the *last* dimension of an input of any rank, e.g. ``(B, T, C)``.

    A ``Linear`` applied to a sequence returns ``(B, T, C)``; ``nn.BatchNorm1d`` would
    normalise over ``T`` (it expects channels second). This subclass flattens every leading
    dimension into the batch, normalises each of the ``C`` features over all ``B*T``
    positions, and restores the shape: exactly ``BatchNorm1d`` applied to the transposed
    ``(B, C, T)`` tensor. It is a BatchNorm (not a LayerNorm) so the fix means the same thing
    as after a plain Linear or Conv: batch statistics while training, running statistics at
    eval. Its ``state_dict`` keys are those of ``nn.BatchNorm1d``. Padding positions of
    variable-length sequences enter the statistics like any other position.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input with at least 2 dimensions, got {input.dim()}")
        if input.shape[-1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} features in the last dimension, got shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        shape = input.shape
        out = super().forward(input.reshape(-1, self.num_features))
        return out.reshape(shape)


@torch.no_grad()
def keep_gate_bias_(rnn: nn.LSTM | nn.GRU, value: float) -> nn.LSTM | nn.GRU:
    """Bias the gate that keeps the state: the LSTM forget gate, the GRU update gate; in place.

    Both are the second of the gate chunks in PyTorch's layout (LSTM: input, forget, cell, output;
    GRU: reset, update, new). The chunk of ``bias_ih`` is set to ``value`` and that of ``bias_hh``
    to zero in every layer and direction, so the gate starts at ``sigmoid(value)``: a cell keeps
    most of its state (and passes the gradient back) from the first step, and training decides
    what to forget (Gers et al. 2000; Jozefowicz et al. 2015; the GRU analogue with
    ``h_t = (1 - z) * n + z * h_(t-1)``).

    Returns:
        ``rnn``, for chaining.
    """
    if not isinstance(rnn, nn.LSTM | nn.GRU):
        raise TypeError(f"keep_gate_bias_ needs an nn.LSTM or nn.GRU, got {type(rnn).__name__}")
    hidden = rnn.hidden_size
    for name, param in rnn.named_parameters():
        if name.startswith("bias_ih"):
            param[hidden : 2 * hidden].fill_(float(value))
        elif name.startswith("bias_hh"):
            param[hidden : 2 * hidden].zero_()
    return rnn


class LSTMAsRNN(nn.LSTM):
    """An ``nn.LSTM`` with ``nn.RNN``'s call signature: ``forward(input, h_0=None) -> (output, h_n)``.

    ``nn.LSTM`` takes and returns ``(h, c)``; call sites written for ``nn.RNN`` unpack
    ``output, h_n = rnn(x)`` and may pass ``h_0``. This adapter keeps them working: a given
    ``h_0`` starts with a zero cell state, and the final cell state is dropped. Code that carries
    the hidden state across calls (truncated BPTT) therefore loses the cell state between
    calls; use ``nn.GRU`` (a true drop-in for ``nn.RNN``) there. Being a subclass, its parameters
    have ``nn.LSTM``'s names, directly on the module.

    Args:
        forget_bias: initial value of the forget-gate bias (``bias_ih``; ``bias_hh`` zero there),
            ``1.0`` by default so the cell remembers from the start (Gers et al. 2000;
            Jozefowicz et al. 2015). ``None`` keeps PyTorch's default initialisation.
        Other arguments as for ``nn.LSTM``.
    """

    def __init__(self, *args: object, forget_bias: float | None = 1.0, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if forget_bias is not None and self.bias:
            keep_gate_bias_(self, forget_bias)

    def forward(  # type: ignore[override]
        self, input: Tensor | PackedSequence, hx: Tensor | None = None
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        if hx is not None:
            hx = (hx, torch.zeros_like(hx))
        output, (h_n, _c_n) = super().forward(input, hx)
        return output, h_n
