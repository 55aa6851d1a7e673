"""Fixes on wrapped submodules (``torch.compile``, activation checkpointing) and the ``calls`` count they read.

Layer names leave wrapper segments out (``body.0``, not ``body._orig_mod.0``), so module lookup,
replacement, replay and code snippets must look through the wrappers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import apply_fixes, paths, replay
from gradwatch.layers import observe_structure


class _Compiled(nn.Module):
    """A sigmoid body compiled on its own, and a plain head."""

    def __init__(self, compile_body: bool = True) -> None:
        super().__init__()
        body = nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid())
        self.body = torch.compile(body, backend="eager") if compile_body else body
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _SharedActivation(nn.Module):
    """One Sigmoid module used at two positions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.act = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def _vanishing(model: nn.Module, x: torch.Tensor, layers: tuple[str, ...], activations: list[str],
               fixes: tuple[str, ...]) -> Diagnosis:
    finding = Finding("vanishing", layers, "critical", "synthetic", evidence={"activations": activations}, fixes=fixes)
    return Diagnosis(findings=(finding,), structure=observe_structure(model, x))


def test_structure_counts_how_often_each_module_ran() -> None:
    model = _SharedActivation()
    calls = observe_structure(model, torch.randn(3, 4))["calls"]
    assert calls == {"fc1": 1, "act": 2, "fc2": 1, "fc3": 1, "(root)": 1}


def test_a_call_through_a_wrapper_counts_once() -> None:
    torch._dynamo.reset()
    model = nn.Sequential(checkpoint_wrapper(nn.Linear(4, 4)), nn.ReLU())
    structure = observe_structure(model, torch.randn(2, 4))
    assert structure["calls"]["0"] == 1  # the wrapper and the Linear it wraps share the name "0"
    compiled = _Compiled()
    calls = observe_structure(compiled, torch.randn(2, 6))["calls"]
    assert calls["body"] == 1 and calls["head"] == 1
    assert all(n == 1 for n in calls.values()), calls


def test_swap_refuses_a_module_that_runs_twice() -> None:
    model = _SharedActivation()
    x = torch.randn(5, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_fixes(model, _vanishing(model, x, ("fc1", "fc2"), ["act"], ("swap_activation",)))
    assert not report.changed
    assert "runs 2 times" in report.changes[0].refused["act"]
    assert isinstance(model.act, nn.Sigmoid)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_get_module_looks_through_compile_and_checkpoint_wrappers() -> None:
    torch._dynamo.reset()
    model = _Compiled()
    inner = model.body._orig_mod
    assert paths.get_module(model, "body.0") is inner[0]
    assert paths.get_module(model, "body._orig_mod.0") is inner[0]  # the spelling with the wrapper still works
    assert paths.get_module(model, "body") is inner  # the module holding the children
    wrapped = nn.Sequential(checkpoint_wrapper(nn.Sequential(nn.Linear(2, 2), nn.Tanh())))
    assert isinstance(paths.get_module(wrapped, "0.1"), nn.Tanh)
    old = paths.set_module(wrapped, "0.1", nn.ReLU())
    assert isinstance(old, nn.Tanh) and isinstance(wrapped[0]._checkpoint_wrapped_module[1], nn.ReLU)
    with pytest.raises(LookupError, match=r"no submodule 'body.7'.*has no child '7'; its children are \['0', '1', '2', '3'\]"):
        paths.get_module(model, "body.7")
    assert paths.expr("body.1", model) == "model.body._orig_mod[1]"  # code the user can paste


def test_fixes_apply_and_replay_on_a_model_with_a_compiled_submodule() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Compiled()
    x = torch.randn(16, 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    n_groups = len(optimizer.param_groups)
    diag = _vanishing(model, x, ("body.0", "body.2"), ["body.1", "body.3"],
                      ("swap_activation", "insert_batchnorm"))
    report = apply_fixes(model, diag, optimizer=optimizer, only=["swap_activation", "he_init"])
    assert [(c.fix, c.status) for c in report.changes] == [("swap_activation", "applied"), ("he_init", "applied")]
    inner = model.body._orig_mod
    assert type(model.body).__name__ == "OptimizedModule"  # the wrapper stays; what it wraps changed
    assert isinstance(inner[1], nn.ReLU) and isinstance(inner[3], nn.ReLU)
    assert "model.body._orig_mod[1] = nn.ReLU()" in report.code
    # BatchNorm insertion adds parameters inside the compiled body: the optimizer learns of them
    bn = apply_fixes(model, _vanishing(model, x, ("body.0", "body.2"), [], ("insert_batchnorm",)), optimizer=optimizer)
    assert bn.changed and isinstance(inner[0], nn.Sequential) and isinstance(inner[0][1], nn.BatchNorm1d)
    assert len(optimizer.param_groups) == n_groups + 1
    assert any(p is inner[0][1].weight for p in optimizer.param_groups[-1]["params"])
    model(x).square().mean().backward()  # still runs forward and backward (recompiled)
    assert inner[0][1].weight.grad is not None

    torch._dynamo.reset()
    fresh = _Compiled()
    replay(fresh, report.to_json())
    replay(fresh, bn.to_dict())
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
