"""Effectiveness: after the recommended fix, training reaches at most half the loss of the unfixed model.

Both models start from the same state and see the same batches for the same number of steps;
only the fix differs (``lstm_gru`` is measured on the reference ``vanilla_rnn`` in
``test_fixes_reference.py``). The ratios are printed (run with ``-s``):

    pytest tests/test_fixes_effectiveness.py -s -q
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import apply_fixes
from gradwatch.layers import observe_structure

pytestmark = pytest.mark.slow


class DeepMLP(nn.Module):
    """10 Linear layers, 32 wide: Linear(16, 32), act, [Linear(32, 32), act] x 8, Linear(32, 1)."""

    def __init__(self, act: type[nn.Module]):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(16, 32), act()]
        for _ in range(8):
            layers += [nn.Linear(32, 32), act()]
        layers.append(nn.Linear(32, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _task(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable regression task: a random two-layer ReLU teacher, targets standardised."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    w1 = torch.randn(16, 16, generator=g) / 4
    w2 = torch.randn(16, generator=g) / 4
    y = torch.relu(x @ w1) @ w2
    return x, ((y - y.mean()) / y.std())[:, None]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, steps: int, batch: int = 64) -> float:
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    return final if math.isfinite(final) else math.inf


def _ratio(base: nn.Module, finding: Finding, make_opt, steps: int, **apply_kwargs) -> tuple[float, float, float]:
    x, y = _task()
    diagnosis = Diagnosis(findings=(finding,), structure=observe_structure(base, x[:64]))
    unfixed = copy.deepcopy(base)
    fixed = copy.deepcopy(base)
    opt_unfixed, opt_fixed = make_opt(unfixed), make_opt(fixed)
    torch.manual_seed(123)
    report = apply_fixes(fixed, diagnosis, optimizer=opt_fixed, **apply_kwargs)
    assert report.changed, str(report)
    loss_unfixed = _train(unfixed, opt_unfixed, x, y, steps)
    loss_fixed = _train(fixed, opt_fixed, x, y, steps)
    ratio = loss_fixed / loss_unfixed
    print(f"\n{finding.kind} {[c.fix for c in report.applied]}: unfixed {loss_unfixed:.4g}, fixed {loss_fixed:.4g}, "
          f"ratio {ratio:.3g} after {steps} steps")
    return loss_unfixed, loss_fixed, ratio


def _sigmoid_mlp() -> nn.Module:
    torch.manual_seed(0)
    return DeepMLP(nn.Sigmoid)


def _vanishing() -> Finding:
    return Finding(
        "vanishing", tuple(f"net.{i}" for i in range(0, 18, 2)), "critical", "vanishing behind sigmoids",
        {"activations": [f"net.{i}" for i in range(1, 18, 2)]},
        ("swap_activation", "he_init", "insert_batchnorm", "residual"),
    )


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def test_swap_activation_then_he_init_cures_a_deep_sigmoid_mlp():
    _, _, ratio = _ratio(_sigmoid_mlp(), _vanishing(), _sgd, steps=200)
    assert ratio <= 0.5


@pytest.mark.parametrize(("fix", "steps"), [("insert_batchnorm", 400), ("residual", 200)])
def test_other_vanishing_fixes_also_halve_the_loss(fix, steps):
    _, _, ratio = _ratio(_sigmoid_mlp(), _vanishing(), _sgd, steps=steps, only=[fix])
    assert ratio <= 0.5


def test_he_init_cures_an_over_scaled_relu_mlp_under_adam():
    torch.manual_seed(0)
    base = DeepMLP(nn.ReLU)
    with torch.no_grad():
        for module in base.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(4.0)
    finding = Finding(
        "exploding", tuple(f"net.{i}" for i in range(0, 19, 2)), "critical", "over-scaled",
        {"optimizer_scale_invariant": True}, ("he_init", "insert_batchnorm", "lower_lr"),
    )
    _, _, ratio = _ratio(base, finding, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), steps=200)
    assert ratio <= 0.5


def test_clipping_keeps_too_large_sgd_steps_from_ruining_training():
    """A well-initialised deep ReLU MLP with an SGD step too large for it: gradient spikes throw it off."""
    torch.manual_seed(0)
    base = DeepMLP(nn.ReLU)
    for module in base.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    finding = Finding(
        "exploding", tuple(f"net.{i}" for i in range(0, 19, 2)), "critical", "spikes",
        {"optimizer_scale_invariant": False}, ("clip_gradients", "lower_lr"),
    )
    _, _, ratio = _ratio(base, finding, lambda m: torch.optim.SGD(m.parameters(), lr=0.2), steps=300)
    assert ratio <= 0.5

