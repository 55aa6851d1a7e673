"""``gradwatch demo`` through the real console entry point: one quick case, logs, table, exit status."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch import demo


def gradwatch_command() -> list[str]:
    script = Path(sys.executable).with_name("gradwatch")
    if script.exists():
        return [str(script)]
    found = shutil.which("gradwatch")
    if found is None:
        pytest.skip("the gradwatch console script is not installed (pip install -e .)")
    return [found]


def run_demo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", COLUMNS="200")
    return subprocess.run([*gradwatch_command(), "demo", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_demo_quick_one_model_writes_logs_and_prints_the_table(tmp_path):
    proc = run_demo("--quick", "--model", "sigmoid_mlp", "--logdir", "tmp", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for phase in ("before", "after"):
        assert list((tmp_path / "tmp" / "sigmoid_mlp" / phase).glob("events.out.tfevents.*")), phase
    assert "loss before -> after" in out and "grad ratio before -> after" in out
    row = next(line for line in out.splitlines() if "sigmoid_mlp" in line and "vanishing" in line and "->" in line)
    assert "yes" in row
    assert out.rstrip().splitlines()[-1].startswith("all 1 case(s) behaved")
    assert "tensorboard --logdir tmp" in out


@pytest.mark.slow  # a `gradwatch demo` subprocess
def test_demo_unknown_model_is_a_usage_error(tmp_path):
    proc = run_demo("--model", "nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown model" in proc.stderr and "sigmoid_mlp" in proc.stderr


def test_check_names_the_missed_finding_and_a_loss_that_did_not_halve():
    from gradwatch.findings import Diagnosis, Finding

    found = Diagnosis(findings=(Finding("dead_units", ("act1",), "warning", "m"),))
    run = demo.RunResult(losses=[1.0], final_loss=1.0, grad_ratio=1.0, diagnosis=found, seconds=0.0)
    fixed = demo.RunResult(losses=[0.8], final_loss=0.8, grad_ratio=1.0, diagnosis=Diagnosis(), seconds=0.0)
    from gradwatch.fixes.record import Change, FixReport

    result = demo.CaseResult(name="x", problem="vanishing", steps=1, before=run, after=fixed,
                             report=FixReport(changes=[Change("he_init", "dead_units")]))
    failures = demo.check(result)
    assert any("missed the intended 'vanishing'" in f for f in failures)
    assert any("['dead_units'] besides" in f for f in failures)
    assert any("did not halve" in f and "1 -> 0.8" in f for f in failures)
