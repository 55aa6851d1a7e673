"""insert_batchnorm: the norm matches the observed layout, can preserve the output, and refuses clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import ChannelLastBatchNorm, apply_fixes, replay
from gradwatch.layers import observe_structure


class Tokens(nn.Module):
    """A Linear applied to (B, T, C) sequences."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 10)
        self.act = nn.Sigmoid()
        self.head = nn.Linear(10, 1)

    def forward(self, x):
        return self.head(self.act(self.proj(x))).mean(dim=1)


def _finding(*layers: str, kind: str = "vanishing") -> Finding:
    return Finding(kind, layers, "critical", "test", {}, ("insert_batchnorm",))


def _diagnosis(model: nn.Module, finding: Finding, x: torch.Tensor) -> Diagnosis:
    return Diagnosis(findings=(finding,), structure=observe_structure(model, x))


def test_linear_on_batch_features_gets_batchnorm1d_and_keeps_its_name():
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
    linear = model[0]
    report = apply_fixes(model, _diagnosis(model, _finding("0"), torch.randn(5, 4)))
    change = report.changes[0]
    assert isinstance(model[0], nn.Sequential) and model[0][0] is linear
    assert type(model[0][1]) is nn.BatchNorm1d and model[0][1].num_features == 8
    assert change.layers == ["0.0"] and change.params_added == ["0.1.weight", "0.1.bias"]
    assert change.code == ["model[0] = nn.Sequential(model[0], nn.BatchNorm1d(8))"]
    assert "default" in change.details["inits"]["0"]


def test_linear_on_sequences_gets_a_channel_last_batchnorm():
    torch.manual_seed(0)
    model = Tokens()
    x = torch.randn(4, 7, 6)
    report = apply_fixes(model, _diagnosis(model, _finding("proj"), x))
    norm = model.proj[1]
    assert type(norm) is ChannelLastBatchNorm and norm.num_features == 10
    assert "features last" in report.changes[0].details["layouts"]["proj"]
    assert "from gradwatch.fixes import ChannelLastBatchNorm" in report.changes[0].imports
    # Exactly BatchNorm1d over the transposed (B, C, T) tensor.
    reference = nn.BatchNorm1d(10)
    reference.load_state_dict(norm.state_dict())
    h = torch.randn(4, 7, 10)
    torch.testing.assert_close(norm(h), reference(h.transpose(1, 2)).transpose(1, 2))
    model(x).sum().backward()


@pytest.mark.parametrize(("conv", "shape", "norm"), [
    (nn.Conv1d(2, 4, 3, padding=1), (3, 2, 9), nn.BatchNorm1d),
    (nn.Conv2d(2, 4, 3, padding=1), (3, 2, 5, 5), nn.BatchNorm2d),
    (nn.Conv3d(2, 4, 3, padding=1), (3, 2, 4, 4, 4), nn.BatchNorm3d),
])
def test_convolutions_get_the_matching_batchnorm(conv, shape, norm):
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(1))
    x = torch.randn(*shape)
    model(x)
    apply_fixes(model, _diagnosis(model, _finding("0"), x))
    assert type(model[0][1]) is norm and model[0][1].num_features == 4
    model(x).sum().backward()


def test_preserve_init_keeps_the_output_on_the_example_batch_in_train_and_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.mul_(4.0)
        model[0].bias.fill_(2.0)
    x = torch.randn(64, 4)
    expected = model(x).detach()
    report = apply_fixes(model, Diagnosis(findings=(_finding("0", "2"),)), example_input=x,
                         options={"insert_batchnorm": {"init": "preserve"}})
    assert "structure observed from example_input" in report.notes[0]
    assert "preserve" in report.changes[0].details["inits"]["0"]
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)  # training mode: batch statistics
    model.eval()
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)  # eval: running statistics


def test_output_layer_and_already_normalised_layers_are_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    report = apply_fixes(model, _diagnosis(model, _finding("0", "3", "5"), torch.randn(6, 4)))
    change = report.changes[0]
    assert change.targets == ["3"]
    assert "already followed by BatchNorm1d" in change.refused["0"]
    assert "model's output" in change.refused["5"]


def test_refusal_without_structure_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    tree = repr(model)
    report = apply_fixes(model, Diagnosis(findings=(_finding("0"),)))
    change = report.changes[0]
    assert change.status == "refused" and "example_input" in change.reason
    assert repr(model) == tree and not report.changed


def test_unbatched_or_exotic_layers_are_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    report = apply_fixes(model, _diagnosis(model, _finding("0"), torch.tensor([[1, 2, 3]])))
    assert "Embedding is not a Linear/Conv layer" in report.changes[0].reason
    single = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    report = apply_fixes(single, _diagnosis(single, _finding("0"), torch.randn(4)))
    assert "unbatched" in report.changes[0].reason


def test_optimizer_gets_the_norm_parameters_with_the_layer_hyperparameters():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.05, "weight_decay": 1e-3}, {"params": model[2].parameters()}],
        lr=0.1, momentum=0.9,
    )
    report = apply_fixes(model, _diagnosis(model, _finding("0"), torch.randn(5, 4)), optimizer=optimizer)
    new_group = optimizer.param_groups[-1]
    assert len(optimizer.param_groups) == 3
    assert new_group["lr"] == 0.05 and new_group["weight_decay"] == 1e-3 and new_group["momentum"] == 0.9
    assert [id(p) for p in new_group["params"]] == [id(model[0][1].weight), id(model[0][1].bias)]
    assert "added as group 2 (hyperparameters of group 0)" in report.changes[0].optimizer


def test_without_optimizer_the_record_says_to_rebuild_it():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    report = apply_fixes(model, _diagnosis(model, _finding("0"), torch.randn(5, 4)))
    assert report.optimizer_rebuild_required
    assert report.changes[0].optimizer.startswith("rebuild required")


def test_named_parameter_groups_stay_consistent():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.named_parameters())
    apply_fixes(model, _diagnosis(model, _finding("0"), torch.randn(5, 4)), optimizer=optimizer)
    assert optimizer.param_groups[-1]["param_names"] == ["0.1.weight", "0.1.bias"]
    fresh = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    replay(fresh, apply_fixes(fresh, Diagnosis(), dry_run=True))  # an empty record replays to nothing
    assert isinstance(fresh[0], nn.Linear)
