"""What every fix promises, checked on real models for each registered fix that changes something.

For each case: the fix applies; the model still runs forward and backward; the parts it does
not touch compute exactly what they did; the optimizer keeps the other parameters' Adam state
and updates the new or re-initialised parameters; ``replay`` on a fresh instance accepts the
fixed model's ``state_dict`` strictly; a dry run changes nothing; the record survives JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import FixReport, apply_fixes, list_fixes, replay
from gradwatch.layers import observe_structure


class MLP(nn.Module):
    """Linear(8,16), act, then Linear(16,16), act x3, Linear(16,1): net.0 ... net.8."""

    def __init__(self, act: type[nn.Module] = nn.Sigmoid):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(8, 16), act()]
        for _ in range(3):
            layers += [nn.Linear(16, 16), act()]
        layers.append(nn.Linear(16, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SeqModel(nn.Module):
    """Linear on (B, T, C), then an nn.RNN, then a head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.act = nn.Tanh()
        self.rnn = nn.RNN(8, 12, batch_first=True)
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, h = self.rnn(self.act(self.proj(x)))
        return self.head(out[:, -1]) + 0.0 * h.sum()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh()
        )
        self.head = nn.Linear(8 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class ResMLP(nn.Module):
    """proj, three residual blocks ``x + fc2(act(fc1(x)))`` without normalisation, head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(16, 16), "act": nn.ReLU(), "fc2": nn.Linear(16, 16)})
                                    for _ in range(3))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for b in self.blocks:
            x = x + b["fc2"](b["act"](b["fc1"](x)))
        return self.head(x)


def _over_scaled_rnn() -> nn.Module:
    model = SeqModel()
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(4.0)
    return model


def _res_prefix(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.blocks[0]["fc1"](model.proj(x))


@dataclass
class Case:
    """A model, an input, a finding naming part of it, and a probe of a part the fix must not touch."""

    fix: str
    build: Callable[[], nn.Module]
    input: Callable[[], torch.Tensor]
    finding: Finding
    untouched: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    options: dict = field(default_factory=dict)


def _mlp_prefix(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.net[3](model.net[2](model.net[1](model.net[0](x))))


def _seq_prefix(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.act(model.proj(x))


def _seq_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.head(torch.ones(2, 12))


def _conv_prefix(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.features[1](model.features[0](x))


def _x_mlp() -> torch.Tensor:
    return torch.randn(32, 8)


def _x_seq() -> torch.Tensor:
    return torch.randn(6, 5, 4)


def _x_conv() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6)


VANISH_LATE = Finding(
    "vanishing", ("net.4", "net.6"), "critical", "late layers vanish (for the test)",
    evidence={"activations": ["net.5", "net.7"]},
    fixes=("swap_activation", "he_init", "insert_batchnorm", "residual"),
)


def _over_scaled_relu() -> nn.Module:
    model = MLP(nn.ReLU)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(5.0)
    return model


CASES = [
    Case("swap_activation", MLP, _x_mlp, VANISH_LATE, _mlp_prefix),
    Case(
        "he_init", _over_scaled_relu, _x_mlp,
        Finding("exploding", ("net.4", "net.6"), "critical", "over-scaled", fixes=("he_init",)),
        _mlp_prefix,
    ),
    Case("insert_batchnorm", MLP, _x_mlp, VANISH_LATE, _mlp_prefix),
    Case("residual", MLP, _x_mlp, VANISH_LATE, _mlp_prefix),
    Case(
        "insert_batchnorm", ConvNet, _x_conv,
        Finding("vanishing", ("features.2",), "warning", "conv", fixes=("insert_batchnorm",)),
        _conv_prefix,
    ),
    Case(
        "insert_batchnorm", SeqModel, _x_seq,
        Finding("saturation", ("act",), "warning", "tanh saturates", {"feeding_layers": ["proj"]},
                fixes=("insert_batchnorm",)),
        _seq_head,
    ),
    Case(
        "lstm_gru", SeqModel, _x_seq,
        Finding("vanishing", ("rnn",), "critical", "rnn", fixes=("lstm_gru",)), _seq_prefix,
    ),
    Case(
        "lstm_gru", SeqModel, _x_seq,
        Finding("vanishing", ("rnn",), "critical", "rnn", fixes=("lstm_gru",)), _seq_prefix,
        options={"lstm_gru": {"to": "lstm"}},
    ),
    Case(
        "rescale_residual", ResMLP, _x_mlp,
        Finding("exploding", ("blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc2"), "critical", "residual growth",
                {"residual_growth": {"branch_last_layers": ["blocks.0.fc2", "blocks.1.fc2"]}},
                fixes=("rescale_residual",)),
        _res_prefix,
    ),
    Case(
        "recurrent_init", _over_scaled_rnn, _x_seq,
        Finding("exploding", ("rnn",), "critical", "recurrence amplifies", fixes=("recurrent_init",)),
        _seq_prefix,
    ),
    Case(
        "clip_gradients", _over_scaled_relu, _x_mlp,
        Finding("exploding", ("net.4", "net.6"), "critical", "spikes", fixes=("clip_gradients",)),
        _mlp_prefix,
    ),
    Case(
        "skip_spikes", _over_scaled_relu, _x_mlp,
        Finding("spike", ("net.4", "net.6"), "critical", "spikes", fixes=("skip_spikes",)),
        _mlp_prefix,
    ),
]
IDS = [f"{c.fix}-{c.build.__name__.lstrip('_')}-{i}" for i, c in enumerate(CASES)]


def _setup(case: Case, seed: int = 0):
    torch.manual_seed(seed)
    model = case.build()
    x = case.input()
    diagnosis = Diagnosis(findings=(case.finding,), structure=observe_structure(model, x))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, x, diagnosis, optimizer


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_fix_that_changes_things_has_a_case():
    assert {c.fix for c in CASES} == set(list_fixes()) - {"lower_lr", "mixed_precision"}  # advice only


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fix_applies_and_model_still_trains(case: Case):
    model, x, diagnosis, optimizer = _setup(case)
    untouched_before = case.untouched(model, x).detach().clone()
    named_before = dict(model.named_parameters())
    state_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}

    report = apply_fixes(model, diagnosis, optimizer=optimizer, only=[case.fix], options=case.options)

    assert [c.status for c in report.changes] == ["applied"], str(report)
    change = report.changes[0]
    assert change.fix == case.fix
    out = model(x)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.equal(case.untouched(model, x), untouched_before)

    # Parameters the fix did not touch keep their Adam state, bit for bit.
    touched = {id(p) for name in change.layers for p in model.get_submodule(name).parameters()}
    for p in model.parameters():
        if id(p) in state_before and id(p) not in touched:
            assert all(torch.equal(optimizer.state[p][k], v) for k, v in state_before[id(p)].items())
    # Every trainable parameter is in the optimizer exactly once; removed ones are gone.
    in_optimizer = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for p in model.parameters())
    removed = [named_before[n] for n in change.params_removed]
    assert not any(p in optimizer.state for p in removed)

    # One step updates the new parameters (and the re-initialised ones).
    new_params = dict(model.named_parameters())
    watched = {n: new_params[n].detach().clone() for n in change.params_added}
    if case.fix == "he_init":
        watched = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("net.4.", "net.6."))}
    before_step = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, value in watched.items():
        assert not torch.equal(new_params[name], value), f"{name} was not updated"
    assert any(not torch.equal(p, before_step[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_replay_gives_a_model_that_loads_the_fixed_weights_strictly(case: Case):
    model, x, diagnosis, optimizer = _setup(case)
    report = apply_fixes(model, diagnosis, optimizer=optimizer, only=[case.fix], options=case.options)
    record = json.loads(report.to_json())
    assert FixReport.from_dict(record).to_dict() == report.to_dict()

    torch.manual_seed(1)
    fresh = case.build()
    replay(fresh, record)
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-6, atol=1e-7)  # same weights; BLAS may differ in the last bit


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dry_run_changes_nothing_and_returns_code(case: Case):
    model, x, diagnosis, optimizer = _setup(case)
    before = _state_copy(model)
    tree = [(n, m) for n, m in model.named_modules()]
    groups = len(optimizer.param_groups)
    opt_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}

    report = apply_fixes(model, diagnosis, optimizer=optimizer, only=[case.fix], dry_run=True, options=case.options)

    assert report.dry_run and not report.changed
    assert [c.status for c in report.changes] == ["planned"], str(report)
    assert _bitwise_equal(before, _state_copy(model))
    assert [(n, m) for n, m in model.named_modules()] == tree
    assert len(optimizer.param_groups) == groups
    assert all(torch.equal(optimizer.state[p][k], v) for p in model.parameters() for k, v in opt_state[id(p)].items())
    assert report.code.strip()
    assert not report.clippers


@pytest.mark.parametrize("case", [c for c in CASES if c.fix != "clip_gradients"], ids=[i for c, i in zip(CASES, IDS, strict=True) if c.fix != "clip_gradients"])
def test_dry_run_code_reproduces_the_structure(case: Case):
    """The snippet, run on the user's own model, builds the same module tree as the fix."""
    model, x, diagnosis, optimizer = _setup(case)
    code = apply_fixes(model, diagnosis, only=[case.fix], dry_run=True, options=case.options).code
    apply_fixes(model, diagnosis, optimizer=optimizer, only=[case.fix], options=case.options)
    torch.manual_seed(2)
    theirs = case.build()
    exec(code, {"model": theirs, "torch": torch, "nn": nn})  # noqa: S102 - the point of the test
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
