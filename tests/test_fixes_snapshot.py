"""snapshot/restore: model tree, values, gradients, optimizer state and groups come back bit for bit."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import apply_fixes, attached_clippers, snapshot
from gradwatch.layers import observe_structure


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.RNN(8, 8), nn.Linear(8, 1)
    )


class Last(nn.Module):
    def forward(self, out_h):
        return out_h[0]


def _net() -> nn.Module:
    model = _model()
    model.insert(6, Last())
    return model


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 4)).square().mean().backward()
        optimizer.step()


def _opt_equal(a: dict, b: dict) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for key, state in a["state"].items():
        other = b["state"][key]
        if state.keys() != other.keys():
            return False
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and not torch.equal(value, other[name]):
                return False
    return True


def _clone_opt(optimizer: torch.optim.Optimizer) -> dict:
    sd = optimizer.state_dict()
    return {
        "param_groups": [dict(g) for g in sd["param_groups"]],
        "state": {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()} for k, s in sd["state"].items()},
    }


def test_restore_undoes_structural_fixes_training_and_optimizer_changes_bitwise():
    model = _net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.named_modules())
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    opt_before = _clone_opt(optimizer)
    snap = snapshot(model, optimizer)

    structure = observe_structure(model, torch.randn(4, 4))
    diagnosis = Diagnosis(
        findings=(
            Finding("vanishing", ("0",), "critical", "v", {"activations": ["1", "4"]}, ("swap_activation",)),
            Finding("saturation", ("1",), "warning", "s", {"feeding_layers": ["0"]}, ("insert_batchnorm",)),
            Finding("vanishing", ("2", "5"), "critical", "v", {}, ("residual", "lstm_gru")),
            Finding("exploding", ("0", "7"), "critical", "e", {}, ("clip_gradients",)),
        ),
        structure=structure,
    )
    report = apply_fixes(model, diagnosis, optimizer=optimizer)
    assert {c.fix for c in report.applied} == {"swap_activation", "he_init", "insert_batchnorm", "residual", "clip_gradients"}
    _train(model, optimizer)
    assert len(optimizer.param_groups) > 1 and attached_clippers(optimizer)

    snap.restore()

    assert list(model.named_modules()) == modules
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))
    assert _opt_equal(_clone_opt(optimizer), opt_before)
    assert attached_clippers(optimizer) == []
    # Training from the restored state is reproducible: restoring again and re-running gives the same bits.
    torch.manual_seed(7)
    _train(model, optimizer, 2)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    snap.restore()
    torch.manual_seed(7)
    _train(model, optimizer, 2)
    assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())


def test_restore_can_be_repeated_and_keeps_train_eval_modes():
    model = _net()
    model[3].eval()
    snap = snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        model.train()
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model(torch.randn(8, 4))  # updates BatchNorm running statistics
        snap.restore()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert model[3].training is False and model[0].training is True


def test_restore_brings_back_a_clipper_removed_after_the_snapshot():
    from gradwatch.fixes import GradientClipper

    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = GradientClipper("autoclip", history=[1.0, 2.0]).attach(optimizer)
    snap = snapshot(model, optimizer)
    _train(model, optimizer)
    clipper.remove()
    snap.restore()
    assert attached_clippers(optimizer) == [clipper] and list(clipper.history) == [1.0, 2.0]
    clipper.remove()
