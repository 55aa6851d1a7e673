"""The fix registry is the one place a fix and its facts are declared.

A throwaway fix, registered here for the duration of a test, is at once a known fix name, in the
preflight set, accepted by ``apply_fixes(only=...)``, ``gradwatch.watch(auto_fix=...)`` and
``gradwatch.preflight(fix=...)``, and its ``why`` is the reason a diagnosis prints: adding a fix
touches nothing but its own module and its registration.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
import gradwatch.findings
from gradwatch.findings import FINDING_KINDS, Diagnosis, Finding
from gradwatch.fixes import Fix, FixContext, Plan, apply_fixes, list_fixes, register_fix, unregister_fix
from gradwatch.fixes.base import target_layers
from gradwatch.fixes.facts import EFFECTS
from gradwatch.fixes.record import Change
from gradwatch.fixes.registry import (
    default_fixes,
    fix_reason,
    get_fix_class,
    gradient_cappers,
    preflight_fixes,
    structural_fixes,
)

WHY = "halving over-scaled weights brings each layer's gain back towards one"


class HalveWeights(Fix):
    """Multiplies the weights of the finding's layers by one half (a test's fix)."""

    name = "halve_weights"
    effect = "weights"
    kinds = ("exploding",)
    why = {"exploding": WHY}
    preflight = True

    def plan(self, ctx: FixContext, finding: Finding, targets: Sequence[str] | None = None) -> Plan:
        plan = Plan()
        names = list(targets) if targets is not None else target_layers(finding)
        for name, module in self.untreated_modules(ctx, names, plan, "already halved by an earlier fix"):
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                plan.targets.append(name)
                plan.code.append(f"model.get_submodule({name!r}).weight.data.mul_(0.5)")
            else:
                plan.refused[name] = f"{type(module).__name__} has no weight"
        plan.reason = "halve the weights" if plan.targets else "nothing to halve: " + plan.refusals()
        return plan

    @torch.no_grad()
    def execute(self, ctx: FixContext, plan: Plan, change: Change) -> None:
        for name in plan.targets:
            self.module_now(ctx, name).weight.mul_(0.5)


@pytest.fixture
def halve_weights() -> Iterator[type[Fix]]:
    register_fix(HalveWeights)
    try:
        yield HalveWeights
    finally:
        unregister_fix(HalveWeights.name)


def _exploding(layers: tuple[str, ...]) -> Diagnosis:
    finding = Finding(kind="exploding", layers=layers, severity="critical", message="weights too large",
                      fixes=("halve_weights",), reasons=(fix_reason("exploding", "halve_weights"),))
    return Diagnosis(findings=(finding,))


def test_a_registered_fix_is_known_everywhere_by_its_class_alone(halve_weights: type[Fix]) -> None:
    assert "halve_weights" in list_fixes() and "halve_weights" in default_fixes()
    assert "halve_weights" in gradwatch.findings.FIX_NAMES
    assert "halve_weights" in preflight_fixes()
    assert "halve_weights" in importlib.import_module("gradwatch.preflight").PREFLIGHT_FIXES  # deprecated name
    assert "halve_weights" not in structural_fixes() and "halve_weights" not in gradient_cappers()
    assert fix_reason("exploding", "halve_weights") == WHY and fix_reason("vanishing", "halve_weights") == ""
    diagnosis = _exploding(("0",))
    assert f"fix 1: halve_weights - {WHY}" in str(diagnosis)


def test_a_registered_fix_is_applied_through_every_entry_point(halve_weights: type[Fix]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = model[0].weight.detach().clone()
    report = apply_fixes(model, _exploding(("0",)), only=["halve_weights"])
    assert [(c.fix, c.status) for c in report.changes] == [("halve_weights", "applied")]
    assert torch.equal(model[0].weight, before * 0.5)
    refused = apply_fixes(model, _exploding(("1",)), only=["halve_weights"]).changes[0]
    assert refused.status == "refused" and "ReLU has no weight" in refused.reason

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, optimizer=optimizer, auto_fix=["halve_weights"]) as watcher:
        assert watcher.autofixer.allowed == ("halve_weights",)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    result = gradwatch.preflight(model, (x, y), F.cross_entropy, fix=["halve_weights"], steps=2)
    assert result.report is not None


def test_an_unregistered_fix_is_unknown_again(halve_weights: type[Fix]) -> None:
    unregister_fix("halve_weights")
    try:
        with pytest.raises(ValueError, match="unknown fix names \\['halve_weights'\\]"):
            _exploding(("0",))
        with pytest.raises(ValueError, match="unknown only names"):
            apply_fixes(nn.Linear(2, 2), Diagnosis(), only=["halve_weights"])
    finally:
        register_fix(HalveWeights)


@pytest.mark.parametrize("name", list_fixes())
def test_every_fix_declares_consistent_facts(name: str) -> None:
    cls = get_fix_class(name)
    assert cls.name == name and cls.effect in EFFECTS
    assert cls.kinds and set(cls.kinds) <= set(FINDING_KINDS)
    assert set(cls.why) <= set(cls.kinds), "a reason for a finding kind the fix does not treat"
    assert not set(cls.why_not) & set(cls.kinds)
    assert cls.structural == (cls.effect == "structural")
    assert not (cls.opt_in and cls.preflight), "preflight applies by default; an opt-in fix is never applied by default"
    assert not cls.caps_gradients or cls.effect == "training"


def test_the_derived_sets_are_the_declared_ones() -> None:
    assert set(structural_fixes()) == {"insert_batchnorm", "residual", "swap_activation", "lstm_gru"}
    assert gradient_cappers() == ("clip_gradients",)
    assert set(preflight_fixes()) == {"swap_activation", "he_init", "insert_batchnorm", "residual", "lstm_gru",
                                      "recurrent_init", "rescale_residual"}
    assert set(list_fixes()) - set(default_fixes()) == {"skip_spikes"}


def test_structural_is_derived_from_effect_and_the_effect_is_checked(halve_weights: type[Fix]) -> None:
    with pytest.raises(TypeError, match="sets `structural`; set `effect` instead"):
        type("Bad", (HalveWeights,), {"structural": True})
    with pytest.raises(TypeError, match="effect='surgery'; allowed"):
        type("Bad", (HalveWeights,), {"effect": "surgery"})
    with pytest.raises(ValueError, match="already registered by HalveWeights"):
        register_fix(type("Other", (HalveWeights,), {}))  # same name, another class
