"""he_init: the right scale for the activation fed, in place, optimizer state reset for those parameters only."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import apply_fixes, get_fix
from gradwatch.layers import observe_structure


def _diagnosis(model: nn.Module, finding: Finding, x: torch.Tensor) -> Diagnosis:
    return Diagnosis(findings=(finding,), structure=observe_structure(model, x))


def _exploding(*layers: str) -> Finding:
    return Finding("exploding", layers, "critical", "over-scaled", {}, ("he_init",))


def test_kaiming_scale_for_relu_lecun_for_the_output_layer_biases_zeroed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 4))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(10.0)
                m.bias.fill_(-3.0)
    report = apply_fixes(model, _diagnosis(model, _exploding("0", "2", "5"), torch.randn(8, 256)))
    change = report.changes[0]
    assert change.status == "applied"
    layers = change.details["layers"]
    assert layers["0"]["activation"] == "relu" and layers["2"]["activation"] == "relu"  # through the BatchNorm
    assert layers["5"]["activation"] == "none"
    assert float(model[0].weight.detach().std()) == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    assert float(model[2].weight.detach().std()) == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    assert float(model[5].weight.detach().std()) == pytest.approx(math.sqrt(1 / 256), rel=0.05)
    assert all((model[i].bias == 0).all() for i in (0, 2, 5))
    assert change.code[0] == "nn.init.kaiming_normal_(model[0].weight, mode='fan_in', nonlinearity='relu')"
    assert change.code[1] == "nn.init.zeros_(model[0].bias)"


def test_xavier_when_a_tanh_is_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 100), nn.Tanh(), nn.Linear(100, 1))
    report = apply_fixes(model, _diagnosis(model, _exploding("0"), torch.randn(4, 200)))
    info = report.changes[0].details["layers"]["0"]
    assert info["init"] == "xavier_normal" and info["activation"] == "tanh"
    expected = nn.init.calculate_gain("tanh") * math.sqrt(2 / 300)
    assert float(model[0].weight.detach().std()) == pytest.approx(expected, rel=0.05)


def test_leaky_relu_gain_uses_the_module_slope():
    model = nn.Sequential(nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    report = apply_fixes(model, _diagnosis(model, _exploding("0"), torch.randn(4, 64)))
    assert report.changes[0].details["layers"]["0"]["kwargs"]["a"] == pytest.approx(0.2)


def test_in_place_same_parameters_optimizer_state_reset_only_for_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 8)).sum().backward()
    optimizer.step()
    params_before = list(model.parameters())
    kept = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in model[2].parameters()}

    report = apply_fixes(model, _diagnosis(model, _exploding("0", "4"), torch.randn(5, 8)), optimizer=optimizer)

    assert all(a is b for a, b in zip(model.parameters(), params_before, strict=True))
    assert "state reset for 4 of 4" in report.changes[0].optimizer
    for p in [*model[0].parameters(), *model[4].parameters()]:
        assert p not in optimizer.state or not optimizer.state[p]
    for p, state in kept.items():
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state.items())
    model(torch.randn(5, 8)).sum().backward()
    optimizer.step()  # fresh Adam state for the re-initialised parameters
    assert int(optimizer.state[model[0].weight]["step"]) == 1
    assert int(optimizer.state[model[2].weight]["step"]) == 2


def test_dead_relu_layer_with_very_negative_bias_is_revived():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        model[0].bias.fill_(-50.0)
    x = torch.randn(64, 10)
    assert (model[1](model[0](x)) == 0).all()
    finding = Finding("dead_units", ("1",), "critical", "dead", {"feeding_layers": ["0"]}, ("he_init", "swap_activation"))
    report = apply_fixes(model, _diagnosis(model, finding, x))
    assert [(c.fix, c.status) for c in report.changes] == [("he_init", "applied")]
    assert (model[1](model[0](x)) > 0).float().mean() > 0.3


def test_layers_other_than_linear_conv_are_refused_and_unchanged():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "rnn": nn.LSTM(4, 4)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finding = _exploding("emb", "rnn", "missing")
    report = apply_fixes(model, Diagnosis(findings=(finding,)))
    change = report.changes[0]
    assert change.status == "refused"
    assert "Embedding is not a Linear/Conv layer" in change.refused["emb"]
    assert "lstm_gru" in change.refused["rnn"]
    assert change.refused["missing"] == "no module of that name in the model"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_conv_layers_get_kaiming_over_their_receptive_field():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3), nn.ReLU(), nn.Conv2d(64, 2, 1))
    apply_fixes(model, _diagnosis(model, _exploding("0"), torch.randn(2, 16, 8, 8)))
    assert float(model[0].weight.detach().std()) == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.05)


def test_nonlinearity_option_and_its_validation():
    model = nn.Sequential(nn.Linear(100, 100), nn.Sigmoid(), nn.Linear(100, 1))
    report = apply_fixes(model, Diagnosis(findings=(_exploding("0"),)), options={"he_init": {"nonlinearity": "relu"}})
    assert report.changes[0].details["layers"]["0"]["init"] == "kaiming_normal"
    with pytest.raises(ValueError, match="allowed"):
        get_fix("he_init", nonlinearity="swish")
