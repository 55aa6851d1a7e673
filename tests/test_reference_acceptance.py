"""Acceptance over the reference-model registry, through the public API only.

For every problem case of :mod:`gradwatch.models`, trained for ``case.default_steps`` from seed 0:

* ``gradwatch.watch`` yields exactly the case's intended finding kind;
* its fixed twin, trained the same way, yields no finding;
* ``gradwatch.apply_fixes`` on that diagnosis (the *recommended* fixes, default policy - not the
  hand-built twin), applied to the model rebuilt from the same seed, at least halves the final loss
  (mean of the last 10 losses) reached in the same number of steps on the same batches.

The loop is the plain one a user writes: ``watch(model, optimizer=opt)``, ``watcher.step(loss)``
after backward, the optimizer step (which collects). Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import functools

import pytest
import torch

import gradwatch
from gradwatch import models

pytestmark = pytest.mark.slow

PROBLEM_CASES = [name for name in models.list_models() if models.create(name).problem is not None]


def train_watched(case: models.ReferenceCase, optimizer: torch.optim.Optimizer) -> tuple[gradwatch.Diagnosis, float]:
    with gradwatch.watch(case.model, optimizer=optimizer) as watcher:
        losses = models.train(case, optimizer=optimizer, on_loss=lambda step, loss: watcher.step(loss))
        diagnosis = watcher.diagnose()
    return diagnosis, models.final_loss(losses)


@functools.cache
def unfixed(name: str) -> tuple[gradwatch.Diagnosis, float]:
    case = models.create(name, seed=0)
    return train_watched(case, case.make_optimizer())


@pytest.mark.parametrize("name", PROBLEM_CASES)
def test_the_problem_model_yields_exactly_its_finding(name):
    diagnosis, _ = unfixed(name)
    problem = models.create(name).problem
    assert sorted(diagnosis.kinds()) == [problem], f"{name}: expected only '{problem}'\n{diagnosis}"


@pytest.mark.parametrize("name", PROBLEM_CASES)
def test_the_fixed_twin_yields_no_finding(name):
    twin = models.create(models.create(name).twin, seed=0)
    diagnosis, _ = train_watched(twin, twin.make_optimizer())
    assert diagnosis.healthy, f"{twin.name}: expected no finding\n{diagnosis}"


@pytest.mark.parametrize("name", PROBLEM_CASES)
def test_the_recommended_fixes_halve_the_loss(name):
    diagnosis, loss_unfixed = unfixed(name)
    assert not diagnosis.healthy, f"{name}: nothing diagnosed, nothing to fix"
    fixed = models.create(name, seed=0)  # the same initial weights and data
    optimizer = fixed.make_optimizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        report = gradwatch.apply_fixes(fixed.model, diagnosis, optimizer=optimizer)
    assert report.applied, f"{name}: no fix applied\n{report}"
    _, loss_fixed = train_watched(fixed, optimizer)
    for clipper in report.clippers:
        clipper.remove()
    ratio = loss_fixed / loss_unfixed
    print(f"\n{name}: {[c.fix for c in report.applied]} unfixed {loss_unfixed:.4g} fixed {loss_fixed:.4g} ratio {ratio:.3g}")
    assert ratio <= 0.5, f"{name}: {[c.fix for c in report.applied]} reached {loss_fixed:.4g} vs {loss_unfixed:.4g}\n{report}"
