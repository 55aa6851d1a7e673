"""Every script in ``examples/`` runs in its fast mode, writes TensorBoard logs, and changes the
diagnosis as it says: the problem it shows is reported before the fix and gone after it.

The scripts are run in-process (imported from their path, ``main(argv)`` called), which spares a
torch import per script; ``tests/test_demo.py`` covers the console entry point in a subprocess.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

#: example -> the finding kind it shows (reported before the fix, gone after it)
PROBLEM = {
    "vanishing_sigmoid": "vanishing",
    "tanh_tiny_init": "vanishing",
    "plain_cnn": "vanishing",
    "vanilla_rnn": "vanishing",
    "exploding_rnn": "exploding",
    "overscaled_relu_adam": "exploding",
    "dead_relu": "dead_units",
    "saturated_sigmoid": "saturation",
    "auto_fix": "vanishing",
    "preflight": "vanishing",
}
#: fix names each example must have applied
APPLIED = {
    "vanishing_sigmoid": {"swap_activation", "he_init"},
    "tanh_tiny_init": {"he_init"},
    "plain_cnn": {"insert_batchnorm"},
    "vanilla_rnn": {"lstm_gru"},
    "exploding_rnn": {"clip_gradients"},
    "overscaled_relu_adam": {"he_init"},
    "dead_relu": {"he_init"},
    "saturated_sigmoid": {"he_init"},
    "preflight": {"lstm_gru"},
}
#: tested elsewhere: the Lightning quickstart (tests/integrations/test_lightning.py), the HF Trainer example
#: (tests/integrations/test_transformers.py)
ELSEWHERE = {"lightning_quickstart", "hf_trainer"}
SLOW = {"plain_cnn", "vanilla_rnn", "exploding_rnn", "preflight"}


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"gradwatch_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def event_files(root: Path) -> list[Path]:
    return sorted(root.rglob("events.out.tfevents.*"))


def test_every_example_is_tested():
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts - ELSEWHERE == set(PROBLEM) | {"quickstart", "reproduce_table"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in PROBLEM])
def test_example_runs_fast_and_the_diagnosis_changes_as_intended(name, tmp_path, capsys):
    result = load(name).main(["--fast", "--logdir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    kind = PROBLEM[name]
    before, after = result["before"], result["after"]
    assert kind in before.kinds(), f"{name}: expected a {kind} finding before the fix\n{before}"
    assert kind not in after.kinds(), f"{name}: the {kind} finding is still there after the fix\n{after}"
    if name in APPLIED:
        applied = {c.fix for c in result["report"].applied}
        assert APPLIED[name] <= applied, str(result["report"])
    assert event_files(tmp_path / "runs"), "no TensorBoard event files written"
    assert "gradwatch diagnosis" in out and f"tensorboard --logdir {tmp_path / 'runs'}" in out


def test_clipping_does_not_cure_the_over_scaled_relu_mlp_under_adam(tmp_path, capsys):
    result = load("overscaled_relu_adam").main(["--fast", "--logdir", str(tmp_path)])
    assert result["loss_clipped"] > 0.5 * result["loss_before"]    # clipping: no real change under Adam
    assert result["loss_after"] < 0.5 * result["loss_before"]      # he_init: the cure


def test_auto_fix_example_applies_verifies_and_keeps(tmp_path, capsys):
    result = load("auto_fix").main(["--fast", "--logdir", str(tmp_path)])
    actions = [e.action for e in result["events"]]
    assert actions[:2] == ["applied", "kept"], actions
    assert result["loss_after"] < result["loss_before"]


def test_quickstart_reports_vanishing(capsys):
    diagnosis = load("quickstart").main(["--steps", "30"])
    assert "vanishing" in diagnosis.kinds()


@pytest.mark.slow
def test_reproduce_table_prints_the_gallery_row_and_writes_both_figures(tmp_path, capsys):
    status = load("reproduce_table").main(["--model", "sigmoid_mlp", "--figures", str(tmp_path), "--out",
                                           str(tmp_path / "table.md")])
    out = capsys.readouterr().out
    assert status == 0, out
    header, rule, row = out.splitlines()[:3]
    assert header.startswith("| problem | what gradwatch reports | fix applied | loss before → after |")
    assert rule.startswith("| --- |")
    assert "`sigmoid_mlp`" in row and "**vanishing**" in row and "→" in row
    assert (tmp_path / "table.md").read_text().startswith(header)
    for phase in ("before", "after"):
        png = tmp_path / f"gradient_flow_{phase}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
