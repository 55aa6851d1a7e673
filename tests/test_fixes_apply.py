"""apply_fixes: the policy (first applicable fix per finding), do-no-harm, errors, records, registry."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradwatch.findings import FIX_NAMES, Diagnosis, Finding
from gradwatch.fixes import FixReport, apply_fixes, get_fix, list_fixes
from gradwatch.layers import observe_structure


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))


def _diagnosis(model: nn.Module, *findings: Finding) -> Diagnosis:
    return Diagnosis(findings=findings, structure=observe_structure(model, torch.randn(6, 4)))


def _snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, snap: tuple[str, dict[str, torch.Tensor]]) -> bool:
    tree, state = snap
    now = model.state_dict()
    return repr(model) == tree and now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def test_registry_matches_the_fix_names_findings_may_recommend():
    assert set(list_fixes()) == set(FIX_NAMES)
    for name in list_fixes():
        assert get_fix(name).name == name


def test_unknown_names_list_the_registry():
    with pytest.raises(ValueError, match=r"unknown fix 'batchnorm'; registered fixes: \[.*'insert_batchnorm'"):
        get_fix("batchnorm")
    model = _model()
    with pytest.raises(ValueError, match=r"unknown only names \['clip'\]; registered fixes"):
        apply_fixes(model, Diagnosis(), only=["clip"])
    with pytest.raises(TypeError, match=r"use \['he_init'\]"):
        apply_fixes(model, Diagnosis(), only="he_init")
    with pytest.raises(ValueError, match=r"unknown options names \['swap'\]"):
        apply_fixes(model, Diagnosis(), options={"swap": {}})
    with pytest.raises(TypeError, match="unknown options \\['bogus'\\] for fix 'residual'; allowed: \\['alpha_init'\\]"):
        apply_fixes(model, Diagnosis(), options={"residual": {"bogus": 1}})
    with pytest.raises(TypeError, match="Diagnosis"):
        apply_fixes(model, [Finding("vanishing", ("0",), "warning", "x")])


def test_healthy_diagnosis_changes_nothing():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters())
    snap = _snapshot(model)
    report = apply_fixes(model, Diagnosis(structure=observe_structure(model, torch.randn(2, 4))), optimizer=optimizer)
    assert not report.changes and not report.changed and str(report) == "gradwatch fixes: nothing to do"
    assert _unchanged(model, snap) and len(optimizer.param_groups) == 1


def test_first_applicable_fix_is_applied_refusals_before_it_are_recorded():
    model = _model()
    finding = Finding("vanishing", ("0", "2"), "critical", "v", {"activations": ["1", "3"]},
                      ("residual", "insert_batchnorm", "swap_activation"))
    report = apply_fixes(model, _diagnosis(model, finding))
    assert [(c.fix, c.status) for c in report.changes] == [("residual", "applied")]
    # Block 0-1 is 4 -> 8 (refused), block 2-3 is 8 -> 8 (wrapped): partial application is still "applies".
    assert "not shape-preserving" in report.changes[0].refused["0"]

    model = _model()
    finding = Finding("vanishing", ("0",), "critical", "v", {"activations": ["1"]},
                      ("residual", "insert_batchnorm", "swap_activation"))
    report = apply_fixes(model, _diagnosis(model, finding))
    assert [(c.fix, c.status) for c in report.changes] == [("residual", "refused"), ("insert_batchnorm", "applied")]
    assert isinstance(model[1], nn.Sigmoid)  # the later-ranked swap was not applied


def test_only_restricts_in_rank_order():
    model = _model()
    finding = Finding("vanishing", ("0", "2"), "critical", "v", {"activations": ["1", "3"]},
                      ("swap_activation", "he_init", "insert_batchnorm"))
    report = apply_fixes(model, _diagnosis(model, finding), only=["insert_batchnorm", "he_init"])
    assert [(c.fix, c.status) for c in report.changes] == [("he_init", "applied")]
    report = apply_fixes(_model(), _diagnosis(_model(), finding), only=["residual"])
    assert not report.changes and "none of" in report.notes[0]


def test_a_fix_acts_only_on_the_layers_its_finding_names():
    model = _model()
    untouched = model[0].weight.detach().clone()
    finding = Finding("exploding", ("2",), "critical", "e", {}, ("he_init",))
    apply_fixes(model, _diagnosis(model, finding))
    assert torch.equal(model[0].weight, untouched) and torch.equal(model[2].bias, torch.zeros(8))


def test_the_same_module_is_not_fixed_twice_across_findings():
    model = _model()
    diagnosis = _diagnosis(
        model,
        Finding("vanishing", ("0", "2"), "critical", "v", {"activations": ["1", "3"]}, ("swap_activation",)),
        Finding("saturation", ("1",), "warning", "s", {"feeding_layers": ["0"]}, ("swap_activation", "insert_batchnorm")),
    )
    report = apply_fixes(model, diagnosis, only=["swap_activation", "insert_batchnorm"])
    # the saturation finding is already treated by the swap made for the vanishing one: no second fix on top
    assert [(c.fix, c.status) for c in report.changes] == [("swap_activation", "applied"), ("swap_activation", "refused")]
    assert "already swapped" in report.changes[1].refused["1"]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_a_finding_partly_treated_by_an_earlier_fix_gets_the_rest_from_that_fix():
    model = _model()
    diagnosis = _diagnosis(
        model,
        Finding("vanishing", ("0", "2"), "critical", "v", {"activations": ["1"]}, ("swap_activation",)),
        Finding("saturation", ("1", "3"), "warning", "s", {"feeding_layers": ["0", "2"]},
                ("swap_activation", "insert_batchnorm")),
    )
    report = apply_fixes(model, diagnosis, only=["swap_activation", "insert_batchnorm"])
    assert [(c.fix, c.status) for c in report.changes] == [("swap_activation", "applied"), ("swap_activation", "applied")]
    assert report.changes[1].targets == ["3"] and "already swapped" in report.changes[1].refused["1"]


def test_later_fixes_address_modules_where_earlier_fixes_moved_them():
    model = _model()
    diagnosis = _diagnosis(
        model,
        Finding("saturation", ("1",), "warning", "s", {"feeding_layers": ["0"]}, ("insert_batchnorm",)),
        Finding("exploding", ("0",), "critical", "e", {}, ("he_init",)),
    )
    report = apply_fixes(model, diagnosis)
    he = report.changes[1]
    assert he.layers == ["0.0"] and he.code[0].startswith("nn.init.xavier_normal_(model[0][0].weight")
    dry = apply_fixes(_model(), _diagnosis(_model(), *diagnosis.findings), dry_run=True)
    assert dry.code == report.code


def test_lower_lr_is_only_recommended_with_the_factor_from_evidence():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    snap = _snapshot(model)
    finding = Finding("exploding", ("0",), "critical", "e", {"update_to_weight": 0.03}, ("lower_lr",))
    report = apply_fixes(model, _diagnosis(model, finding), optimizer=optimizer)
    change = report.changes[0]
    assert change.status == "recommended" and not report.changed
    assert change.details["factor"] == pytest.approx(0.02) and change.details["suggested_lr"] == [pytest.approx(0.01)]
    assert optimizer.param_groups[0]["lr"] == 0.5 and _unchanged(model, snap)
    assert change.code[-1] == "    group['lr'] *= 0.02"
    explicit = Finding("exploding", ("0",), "critical", "e", {"lr_factor": 0.3}, ("lower_lr",))
    assert apply_fixes(model, _diagnosis(model, explicit)).changes[0].details["factor"] == 0.3


def test_report_serialises_to_json_and_reads_as_a_report():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters())
    finding = Finding("vanishing", ("0", "2"), "critical", "v", {"activations": ["1", "3"]}, ("swap_activation", "he_init"))
    report = apply_fixes(model, _diagnosis(model, finding), optimizer=optimizer)
    data = json.loads(report.to_json())
    assert data["version"] == 1 and [c["fix"] for c in data["changes"]] == ["swap_activation", "he_init"]
    again = FixReport.from_json(report.to_json())
    assert again.to_dict() == report.to_dict()
    text = str(report)
    assert "[applied] swap_activation (vanishing) on 1, 3" in text and "model[1] = nn.ReLU()" in text


def test_structure_is_observed_from_example_input_when_the_diagnosis_has_none():
    model = _model()
    finding = Finding("vanishing", ("2",), "critical", "v", {}, ("residual",))
    report = apply_fixes(model, Diagnosis(findings=(finding,)), example_input=torch.randn(3, 4))
    assert report.changes[0].status == "applied" and "observed from example_input" in report.notes[0]


def test_structural_fixes_refuse_a_ddp_wrapped_model_but_in_place_ones_work():
    model = _model()
    wrapped = nn.DataParallel(model)  # on CPU: a wrapper holding .module, like DDP
    finding = Finding("vanishing", ("0", "2"), "critical", "v", {"activations": ["1", "3"]}, ("swap_activation",))
    snap = _snapshot(model)
    report = apply_fixes(wrapped, _diagnosis(model, finding))
    assert report.changes[0].status == "refused" and "DataParallel" in report.changes[0].reason
    assert _unchanged(model, snap)
    report = apply_fixes(wrapped, _diagnosis(model, Finding("exploding", ("0",), "critical", "e", {}, ("he_init",))))
    assert report.changes[0].status == "applied" and report.changes[0].targets == ["0"]
