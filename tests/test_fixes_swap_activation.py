"""swap_activation: saturating hidden activations go, the output activation stays, functional ones are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import apply_fixes, get_fix
from gradwatch.layers import observe_structure


class Classifier(nn.Module):
    """Tanh hidden layers and a Sigmoid output activation (probabilities)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(5, 8), nn.Tanh()
        self.fc2, self.act2 = nn.Linear(8, 8), nn.Tanh()
        self.head, self.out = nn.Linear(8, 1), nn.Sigmoid()

    def forward(self, x):
        return self.out(self.head(self.act2(self.fc2(self.act1(self.fc1(x))))))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.sigmoid(self.fc2(torch.sigmoid(self.fc1(x)))))


def _diagnosis(model, finding) -> Diagnosis:
    return Diagnosis(findings=(finding,), structure=observe_structure(model, torch.randn(4, 5)))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_hidden_activations_swapped_output_activation_kept():
    torch.manual_seed(0)
    model = Classifier()
    finding = Finding(
        "vanishing", ("fc1", "fc2"), "critical", "v",
        {"activations": ["act1", "act2", "out"]},  # a sloppy diagnosis naming the output too
        ("swap_activation",),
    )
    report = apply_fixes(model, _diagnosis(model, finding), only=["swap_activation"])
    change = report.changes[0]
    assert change.status == "applied" and change.targets == ["act1", "act2"]
    assert isinstance(model.act1, nn.ReLU) and isinstance(model.act2, nn.ReLU)
    assert isinstance(model.out, nn.Sigmoid)
    assert "output range" in change.refused["out"]
    assert change.code == ["model.act1 = nn.ReLU()", "model.act2 = nn.ReLU()"]
    assert not change.params_added and not change.params_removed
    y = model(torch.randn(3, 5))
    assert ((y > 0) & (y < 1)).all()


def test_without_evidence_it_follows_the_forward_pass_from_the_named_layers():
    model = Classifier()
    finding = Finding("vanishing", ("fc1", "fc2"), "critical", "v", {}, ("swap_activation",))
    report = apply_fixes(model, _diagnosis(model, finding), only=["swap_activation"])
    assert report.changes[0].targets == ["act1", "act2"]


def test_only_the_named_activations_change():
    model = Classifier()
    finding = Finding("saturation", ("act2",), "warning", "s", {"feeding_layers": ["fc2"]}, ("swap_activation",))
    apply_fixes(model, _diagnosis(model, finding))
    assert isinstance(model.act1, nn.Tanh) and isinstance(model.act2, nn.ReLU)


def test_functional_activation_is_refused_with_a_recommendation_and_nothing_changes():
    torch.manual_seed(0)
    model = Functional()
    before = _state(model)
    tree = repr(model)
    finding = Finding("vanishing", ("fc1", "fc2"), "critical", "v", {"activations": []}, ("swap_activation",))
    report = apply_fixes(model, _diagnosis(model, finding))
    change = report.changes[0]
    assert change.status == "refused"
    assert "Functional.forward calls sigmoid" in change.reason and "torch.relu" in change.reason
    assert repr(model) == tree and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not report.changed


def test_dead_units_get_leaky_relu_by_default():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    finding = Finding("dead_units", ("1",), "critical", "dead", {"feeding_layers": ["0"]}, ("swap_activation",))
    diagnosis = Diagnosis(findings=(finding,), structure=observe_structure(model, torch.randn(3, 4)))
    report = apply_fixes(model, diagnosis, only=["swap_activation"])
    assert isinstance(model[1], nn.LeakyReLU) and model[1].negative_slope == 0.01
    assert isinstance(model[3], nn.ReLU)
    assert report.changes[0].code == ["model[1] = nn.LeakyReLU(negative_slope=0.01)"]


def test_target_is_configurable():
    model = Classifier()
    finding = Finding("vanishing", ("fc1",), "critical", "v", {"activations": ["act1"]}, ("swap_activation",))
    apply_fixes(model, _diagnosis(model, finding), options={"swap_activation": {"to": "gelu"}}, only=["swap_activation"])
    assert isinstance(model.act1, nn.GELU)


def test_swap_is_followed_by_he_init_on_the_feeding_layers():
    torch.manual_seed(0)
    model = Classifier()
    finding = Finding(
        "vanishing", ("fc1", "fc2"), "critical", "v", {"activations": ["act1", "act2"]}, ("swap_activation", "he_init")
    )
    head = model.head.weight.detach().clone()
    report = apply_fixes(model, _diagnosis(model, finding))
    assert [(c.fix, c.status) for c in report.changes] == [("swap_activation", "applied"), ("he_init", "applied")]
    he = report.changes[1]
    assert he.targets == ["fc1", "fc2"]
    assert {v["activation"] for v in he.details["layers"].values()} == {"relu"}
    assert torch.equal(model.head.weight, head)
    assert (model.fc1.bias == 0).all()


def test_only_without_he_init_does_not_reinitialise():
    model = Classifier()
    weight = model.fc1.weight.detach().clone()
    finding = Finding("vanishing", ("fc1",), "critical", "v", {"activations": ["act1"]}, ("swap_activation", "he_init"))
    report = apply_fixes(model, _diagnosis(model, finding), only=["swap_activation"])
    assert [c.fix for c in report.changes] == ["swap_activation"]
    assert torch.equal(model.fc1.weight, weight)


def test_bad_target_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: .*relu.*leaky_relu"):
        get_fix("swap_activation", to="swish")
    with pytest.raises(TypeError, match="allowed: \\['to', 'negative_slope'\\]"):
        get_fix("swap_activation", target="relu")


def test_a_module_run_at_several_positions_is_refused_when_the_structure_counts_calls():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head, self.act = nn.Linear(5, 8), nn.Linear(8, 1), nn.Sigmoid()

        def forward(self, x):
            return self.act(self.head(self.act(self.fc(x))))  # the hidden and the output activation

    model = Shared()
    structure = observe_structure(model, torch.randn(2, 5))
    structure["calls"] = {"act": 2}
    finding = Finding("vanishing", ("fc",), "critical", "v", {"activations": ["act"]}, ("swap_activation",))
    report = apply_fixes(model, Diagnosis(findings=(finding,), structure=structure))
    assert report.changes[0].status == "refused" and "runs 2 times" in report.changes[0].reason
    assert isinstance(model.act, nn.Sigmoid)
