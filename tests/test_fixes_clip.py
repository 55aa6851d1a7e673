"""clip_gradients: the clipper bounds what it promises, lives on the optimizer, and refuses vanishing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import FixContext, GradientClipper, apply_fixes, attached_clippers, get_fix
from gradwatch.fixes.clipping import agc_, autoclip_threshold, global_norm, unitwise_norm


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _backward(model: nn.Module, scale: float = 100.0) -> None:
    x = torch.randn(20, 6)
    (model(x).square().sum() * scale).backward()


def _grad_norm(model: nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


def test_global_norm_matches_brute_force_float64():
    grads = [torch.randn(3, 4), torch.randn(7), torch.randn(2, 2, 2)]
    brute = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert float(global_norm(grads)) == pytest.approx(brute, rel=1e-6)


def test_norm_pre_hook_bounds_the_global_norm_before_each_step():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    clipper = GradientClipper("norm", max_norm=0.5).attach(optimizer)
    _backward(model)
    before = _grad_norm(model)
    assert before > 0.5
    optimizer.step()  # the pre-hook clips in place; lr=0 keeps the weights for the check
    assert _grad_norm(model) == pytest.approx(0.5, rel=1e-4)
    assert clipper.last_norm == pytest.approx(before, rel=1e-5)  # logged pre-clip
    assert clipper.threshold == 0.5 and clipper.clipped_steps == 1


def test_norm_mode_matches_torch_clip_grad_norm():
    a, b = _model(), _model()
    _backward(a)
    for p, q in zip(b.parameters(), a.parameters(), strict=True):
        p.grad = q.grad.clone()
    GradientClipper("norm", max_norm=1.0).clip_(a.parameters())
    nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)


def test_small_gradients_are_left_alone():
    model = _model()
    _backward(model, scale=1e-6)
    grads = [p.grad.clone() for p in model.parameters()]
    GradientClipper("norm", max_norm=10.0).clip_(model.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_autoclip_threshold_is_the_percentile_of_the_given_history():
    history = [float(v) for v in np.random.default_rng(0).lognormal(size=57)]
    for percentile in (0.0, 10.0, 37.5, 90.0, 100.0):
        clipper = GradientClipper("autoclip", percentile=percentile, history=history)
        assert clipper.threshold == pytest.approx(float(np.percentile(history, percentile)), rel=1e-12)
    assert autoclip_threshold([], 10.0) == math.inf


def test_autoclip_records_the_current_norm_then_clips_at_the_percentile():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    history = [1.0, 2.0, 3.0, 4.0]
    clipper = GradientClipper("autoclip", percentile=50.0, history=history).attach(optimizer)
    _backward(model)
    norm = _grad_norm(model)
    optimizer.step()
    expected = float(np.percentile(history + [norm], 50.0))
    assert clipper.threshold == pytest.approx(expected)
    assert _grad_norm(model) == pytest.approx(expected, rel=1e-4)
    assert list(clipper.history)[-1] == pytest.approx(norm)


def test_agc_bounds_unitwise_gradient_to_weight_ratios():
    model = _model()
    _backward(model, scale=1e3)
    clip_factor, eps = 0.02, 1e-3
    agc_(model.parameters(), clip_factor, eps)
    for p in model.parameters():
        ratio = unitwise_norm(p.grad) / unitwise_norm(p.detach()).clamp(min=eps)
        assert float(ratio.max()) <= clip_factor * (1 + 1e-4)


def test_agc_leaves_units_below_the_ratio_untouched():
    layer = nn.Linear(4, 3)
    layer.weight.grad = torch.zeros(3, 4)
    layer.weight.grad[0] = 1e-6  # tiny: below the ratio
    layer.weight.grad[1] = 100.0  # huge: clipped
    before = layer.weight.grad.clone()
    agc_([layer.weight], clip_factor=0.01)
    assert torch.equal(layer.weight.grad[0], before[0])
    assert not torch.equal(layer.weight.grad[1], before[1])


def test_agc_via_optimizer_pre_hook():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    clipper = GradientClipper("agc", clip_factor=0.01).attach(optimizer)
    _backward(model, scale=1e3)
    optimizer.step()
    assert clipper.threshold == 0.01 and clipper.clipped_steps == 1
    for p in model.parameters():
        assert float((unitwise_norm(p.grad) / unitwise_norm(p.detach()).clamp(min=1e-3)).max()) <= 0.01 * (1 + 1e-4)


def test_nonfinite_gradients_skip_the_step():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = GradientClipper("autoclip").attach(optimizer)
    _backward(model)
    next(model.parameters()).grad[0, 0] = float("nan")
    weights = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert clipper.skipped_steps == 1 and len(clipper.history) == 0


def test_remove_takes_the_hook_off():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    clipper = GradientClipper("norm", max_norm=0.1).attach(optimizer)
    assert attached_clippers(optimizer) == [clipper]
    clipper.remove()
    clipper.remove()  # idempotent
    assert attached_clippers(optimizer) == []
    _backward(model)
    before = _grad_norm(model)
    optimizer.step()
    assert _grad_norm(model) == pytest.approx(before)


def test_state_dict_round_trip_keeps_history_and_threshold():
    clipper = GradientClipper("autoclip", percentile=25.0, history=[3.0, 1.0, 2.0])
    other = GradientClipper("autoclip", percentile=25.0)
    other.load_state_dict(clipper.state_dict())
    assert list(other.history) == [3.0, 1.0, 2.0] and other.threshold == clipper.threshold


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "value"}, "allowed"),
        ({"mode": "norm", "max_norm": 0.0}, "max_norm"),
        ({"mode": "autoclip", "percentile": 120}, "percentile"),
        ({"mode": "agc", "clip_factor": 0}, "clip_factor"),
    ],
)
def test_bad_clipper_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientClipper(**kwargs)


def _exploding(fixes=("clip_gradients", "lower_lr"), **evidence) -> Diagnosis:
    return Diagnosis(findings=(Finding("exploding", ("0", "2"), "critical", "explodes", evidence, fixes),))


def test_apply_fixes_installs_one_clipper_and_reports_its_threshold():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters())
    diagnosis = Diagnosis(
        findings=(
            Finding("nonfinite", ("0",), "critical", "nan", {}, ("clip_gradients", "lower_lr")),
            Finding("exploding", ("0", "2"), "critical", "big", {"total_norm_percentiles": {"p10": 1, "p50": 2, "p90": 9}},
                    ("clip_gradients", "lower_lr")),
        )
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_fixes(model, diagnosis, optimizer=optimizer)
    assert [(c.fix, c.status) for c in report.changes] == [
        ("clip_gradients", "applied"), ("clip_gradients", "refused"), ("lower_lr", "recommended")
    ]
    assert "already installed" in report.changes[1].reason
    assert report.clippers == attached_clippers(optimizer) and len(report.clippers) == 1
    assert report.changes[0].details["clipper"]["threshold"] == 1.0  # the default max_norm
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    report.clippers[0].remove()


def test_norm_threshold_is_an_option_and_observed_norms_are_recorded():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    diagnosis = _exploding(total_norm_percentiles={"p10": 1.0, "p50": 2.5, "p90": 9.0})
    report = apply_fixes(model, diagnosis, optimizer=optimizer, options={"clip_gradients": {"max_norm": 2.5}})
    assert report.clippers[0].threshold == 2.5
    assert report.changes[0].details["clipper"]["observed_norm_percentiles"]["p90"] == 9.0
    report.clippers[0].remove()


def test_autoclip_is_seeded_from_the_evidence_history():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = [5.0, 1.0, 3.0, 2.0, 4.0]
    report = apply_fixes(model, _exploding(total_norm_history=history), optimizer=optimizer,
                         options={"clip_gradients": {"mode": "autoclip"}})
    assert report.clippers[0].threshold == pytest.approx(float(np.percentile(history, 10)))
    assert report.to_dict()["changes"][0]["details"]["clipper"]["seeded_history"] == 5
    report.clippers[0].remove()


def test_clipping_never_applies_to_vanishing_gradients():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    finding = Finding("vanishing", ("0",), "critical", "vanish", {}, ("clip_gradients",))
    report = apply_fixes(model, Diagnosis(findings=(finding,)), optimizer=optimizer)
    assert [c.status for c in report.changes] == ["refused"]
    assert "never lifts vanishing" in report.changes[0].reason
    assert attached_clippers(optimizer) == []
    applicability = get_fix("clip_gradients").applies(FixContext(model, {}, optimizer), finding)
    assert not applicability and "vanishing" in applicability.reason


def test_without_optimizer_it_refuses_with_code_and_lower_lr_is_recommended():
    model = _model()
    report = apply_fixes(model, _exploding())
    clip, lower = report.changes
    assert clip.status == "refused" and "optimizer" in clip.reason
    assert any("clip" in line for line in clip.code)
    assert lower.status == "recommended" and lower.details["factor"] == 0.1
    assert not report.changed
    assert "# clip_gradients (exploding) - not applied: needs the optimizer" in report.code
    assert "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)" in report.code
