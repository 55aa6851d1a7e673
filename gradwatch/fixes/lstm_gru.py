"""``lstm_gru``: replace a vanilla ``nn.RNN`` by a gated ``nn.GRU`` or LSTM with the same sizes and flags.

Why: a vanilla RNN's gradient through time is a product of one Jacobian per step, so it
vanishes (or explodes) geometrically with sequence length; gated cells carry their state
through an additive path controlled by learnt gates (Hochreiter & Schmidhuber 1997; Cho et al.
2014), so the gradient survives long sequences.

Targets: the ``nn.RNN`` layers among ``finding.layers`` (exactly ``nn.RNN``; LSTM/GRU or custom
cells are refused, naming their class). The replacement has ``input_size``, ``hidden_size``,
``num_layers``, ``bias``, ``batch_first``, ``dropout`` and ``bidirectional`` of the original and
the same device and dtype; ``nonlinearity`` has no counterpart. **Its weights are new** (gates
have 3x/4x the weights; nothing of the RNN's can be carried over), so the report lists the old
parameters as removed and the new ones as added, and the optimizer is updated accordingly.

``to="gru"`` (the default) is a true drop-in: ``nn.GRU`` has ``nn.RNN``'s call signature and
returns ``(output, h_n)``, even when a hidden state is carried across calls. ``to="lstm"`` uses
:class:`~gradwatch.fixes.modules.LSTMAsRNN`, an ``nn.LSTM`` subclass that accepts ``h_0`` and returns
``(output, h_n)`` so call sites keep working; its cell state does not survive between calls.

The gate that keeps the state starts biased towards keeping it
(:func:`~gradwatch.fixes.modules.keep_gate_bias_`): GRU update gate ``2.0`` (``z ~ 0.88``), LSTM
forget gate ``1.0`` (Jozefowicz et al. 2015). Without it a fresh gated cell forgets about half
its state per step and long-range gradients still fade at first: on the reference
``vanilla_rnn`` task (50 steps) a GRU with PyTorch's init ends at 0.59x the RNN's loss, with
update bias 1.0 at 0.44x, with 2.0 at 0.003-0.04x (three seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from gradwatch.findings import Finding
from gradwatch.fixes import ops
from gradwatch.fixes.base import Fix, FixContext, Plan
from gradwatch.fixes.registry import register_fix

TARGETS: tuple[str, ...] = ("gru", "lstm")
#: Initial bias of the state-keeping gate per target (see the module docstring).
DEFAULT_GATE_BIAS: dict[str, float] = {"gru": 2.0, "lstm": 1.0}


def rnn_config(module: nn.RNN) -> dict[str, Any]:
    """The constructor arguments of ``module`` that a GRU/LSTM shares."""
    return {
        "input_size": int(module.input_size),
        "hidden_size": int(module.hidden_size),
        "num_layers": int(module.num_layers),
        "bias": bool(module.bias),
        "batch_first": bool(module.batch_first),
        "dropout": float(module.dropout),
        "bidirectional": bool(module.bidirectional),
    }


@register_fix
class LstmGru(Fix):
    """Swap ``nn.RNN`` layers for ``nn.GRU`` (default) or an RNN-compatible LSTM.

    Args:
        to: ``"gru"`` (default, true drop-in) or ``"lstm"``.
        gate_bias: initial bias of the state-keeping gate (GRU update / LSTM forget gate); default
            ``None`` picks ``2.0`` for GRU and ``1.0`` for LSTM.

    Raises:
        ValueError: ``to`` not among the choices above.
    """

    name = "lstm_gru"
    effect = "structural"
    kinds = ("vanishing", "exploding")
    preflight = True
    why = {
        "vanishing": "gated recurrences (LSTM/GRU) carry gradients through time additively instead of "
                     "through repeated tanh/weight products",
        "exploding": "gated cells (GRU/LSTM) set their gain through time with learnt gates instead of a fixed "
                     "recurrent matrix, so the state and its gradient do not grow step after step",
    }

    def __init__(self, to: str = "gru", gate_bias: float | None = None):
        if to not in TARGETS:
            raise ValueError(f"lstm_gru: to={to!r}; allowed: {TARGETS}")
        self.to = to
        self.gate_bias = float(gate_bias) if gate_bias is not None else DEFAULT_GATE_BIAS[to]

    def options(self) -> dict[str, Any]:
        return {"to": self.to, "gate_bias": self.gate_bias}

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        names = list(targets) if targets is not None else list(finding.layers)
        for name, module in self.untreated_modules(ctx, names, plan, "already replaced by an earlier fix"):
            if type(module) is not nn.RNN:
                plan.refused[name] = f"{type(module).__name__} is not an nn.RNN (only vanilla RNNs are swapped)"
            else:
                plan.targets.append(name)
                plan.ops.append(
                    {
                        "op": "swap_rnn",
                        "path": ctx.path(name),
                        "to": self.to,
                        "config": rnn_config(module),
                        "gate_bias": self.gate_bias,
                    }
                )
        new = "nn.GRU" if self.to == "gru" else "LSTMAsRNN (an nn.LSTM returning (output, h_n))"
        plan.details = {"to": self.to, "new_weights": True, "gate_bias": self.gate_bias}
        if not plan.targets:
            plan.reason = "no nn.RNN to replace: " + plan.refusals()
            return plan
        plan.code = [line for op in plan.ops for line in ops.code(op, ctx.model)]
        plan.code.append("# new weights: the replacement starts untrained; rebuild or update the optimizer")
        plan.imports = list(dict.fromkeys(line for op in plan.ops for line in ops.imports(op)))
        plan.reason = (
            f"nn.RNN -> {new} with the same sizes and flags (new weights): gated cells keep the gradient alive "
            "over long sequences"
        )
        return plan
