"""residual: only shape-preserving blocks (as observed) are wrapped; names stay; alpha starts at zero."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import Residual, apply_fixes
from gradwatch.layers import observe_structure


def _finding(*layers: str) -> Finding:
    return Finding("vanishing", layers, "critical", "deep", {}, ("residual",))


def _diagnosis(model: nn.Module, finding: Finding, x: torch.Tensor) -> Diagnosis:
    return Diagnosis(findings=(finding,), structure=observe_structure(model, x))


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(),
        nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.0),
        nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 2),
    )


def test_blocks_are_layer_plus_following_modules_and_names_stay():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(5, 6)
    names_after = [n for n, _ in model.named_children()]
    report = apply_fixes(model, _diagnosis(model, _finding("0", "2", "5", "7"), x))
    change = report.changes[0]
    assert change.targets == ["2", "5"]
    assert "not shape-preserving" in change.refused["0"] and "[5, 6] -> output [5, 16]" in change.refused["0"]
    assert "model's output" in change.refused["7"]
    assert [n for n, _ in model.named_children()] == names_after
    assert isinstance(model[2], Residual) and isinstance(model[3], nn.Identity) and isinstance(model[4], nn.Identity)
    assert [type(m).__name__ for m in model[2].block] == ["Linear", "Tanh", "Dropout"]
    assert change.ops[0]["span"] == ["2", "3", "4"] and change.ops[0]["expect"] == ["Linear", "Tanh", "Dropout"]
    assert change.params_added == ["2.alpha", "5.alpha"]
    assert change.code[:3] == [
        "model[2] = Residual(nn.Sequential(model[2], model[3], model[4]), alpha_init=0.0)",
        "model[3] = nn.Identity()",
        "model[4] = nn.Identity()",
    ]


def test_alpha_starts_at_zero_so_blocks_start_bypassed_and_gradients_reach_alpha():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(5, 6)
    apply_fixes(model, _diagnosis(model, _finding("2", "5"), x))
    h = model[1](model[0](x))
    torch.testing.assert_close(model[2](h), h)
    model(x).sum().backward()
    assert model[2].alpha.grad is not None and model[2].alpha.grad != 0
    assert float(model[2].alpha.detach()) == 0.0


def test_layer_of_a_custom_module_is_wrapped_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.mid = nn.Linear(8, 8)
            self.out = nn.Linear(8, 1)

        def forward(self, x):
            return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))

    model = Net()
    report = apply_fixes(model, _diagnosis(model, _finding("inp", "mid"), torch.randn(2, 3)))
    assert isinstance(model.mid, Residual) and isinstance(model.mid.block, nn.Linear)
    assert report.changes[0].code == ["model.mid = Residual(model.mid, alpha_init=0.0)"]
    assert "not shape-preserving" in report.changes[0].refused["inp"]


def test_no_shape_preserving_block_is_a_clear_refusal_that_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tree = repr(model)
    optimizer = torch.optim.Adam(model.parameters())
    report = apply_fixes(model, _diagnosis(model, _finding("0", "2"), torch.randn(3, 4)), optimizer=optimizer)
    change = report.changes[0]
    assert change.status == "refused"
    assert change.reason.startswith("no shape-preserving block to wrap")
    assert repr(model) == tree and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len(optimizer.param_groups) == 1


def test_without_observed_structure_nothing_is_guessed():
    model = _mlp()
    report = apply_fixes(model, Diagnosis(findings=(_finding("2"),)))
    assert report.changes[0].status == "refused" and "example_input" in report.changes[0].reason
    assert isinstance(model[2], nn.Linear)


def test_alpha_init_option():
    model = _mlp()
    apply_fixes(model, _diagnosis(model, _finding("2"), torch.randn(2, 6)), options={"residual": {"alpha_init": 0.5}})
    assert float(model[2].alpha.detach()) == 0.5
