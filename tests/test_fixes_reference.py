"""Effectiveness on the reference problem models (``gradwatch.models``), parametrised over the registry.

For each problem case, a finding of the case's kind names every layer (and the hidden activations,
or the dead/saturated ones with the layers feeding them) and recommends the case's cure;
``apply_fixes`` turns it into changes. The fixed model and an untouched one, built bitwise
identical from the same seed, train for ``case.default_steps`` on the same batches; the fixed one
must reach at most half the final loss. Run with ``-s`` to see the ratios:

    pytest tests/test_fixes_reference.py -s -q
"""

from __future__ import annotations

import pytest
import torch

from gradwatch import models
from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import apply_fixes
from gradwatch.fixes.topology import Topology
from gradwatch.layers import ACTIVATION_TYPES, SATURATING, discover_layers, observe_structure

pytestmark = pytest.mark.slow

PROBLEM_CASES = [name for name in models.list_models() if models.create(name).problem is not None]


def _finding(case: models.ReferenceCase) -> Diagnosis:
    model = case.model
    structure = observe_structure(model, case.batch(0)[0])
    topology = Topology({(n or "(root)"): m for n, m in model.named_modules()}, structure)
    outputs = topology.output_activations()
    saturating = [n for n, m in model.named_modules() if isinstance(m, SATURATING) and n not in outputs]
    others = [n for n, m in model.named_modules() if isinstance(m, ACTIVATION_TYPES) and not isinstance(m, SATURATING)]
    if case.problem in ("dead_units", "saturation"):
        names = others if case.problem == "dead_units" else saturating
        feeding = [f for f in (topology.feeding_layer(a) for a in names) if f is not None]
        finding = Finding(case.problem, tuple(names), "critical", "reference", {"feeding_layers": feeding}, case.cure)
    else:
        layers = tuple(layer.name for layer in discover_layers(model))
        evidence: dict = {"activations": saturating}
        if "rescale_residual" in case.cure:  # it acts only on branches the diagnosis measured: name them as it would
            evidence["residual_growth"] = {"branch_last_layers": [n for n in layers if n.endswith(".fc2")]}
        finding = Finding(case.problem, layers, "critical", "reference", evidence, case.cure)
    return Diagnosis(findings=(finding,), structure=structure)


@pytest.mark.parametrize("name", PROBLEM_CASES)
def test_the_cure_halves_the_final_loss_of_the_reference_problem(name):
    unfixed, fixed = models.create(name, seed=0), models.create(name, seed=0)
    optimizer = fixed.make_optimizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        report = apply_fixes(fixed.model, _finding(fixed), optimizer=optimizer)
    assert report.changed, str(report)
    loss_unfixed = models.final_loss(models.train(unfixed))
    loss_fixed = models.final_loss(models.train(fixed, optimizer=optimizer))
    ratio = loss_fixed / loss_unfixed
    print(f"\n{name}: {[c.fix for c in report.applied]} unfixed {loss_unfixed:.4g}, fixed {loss_fixed:.4g}, "
          f"ratio {ratio:.3g} after {unfixed.default_steps} steps")
    assert ratio <= 0.5
