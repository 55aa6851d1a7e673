"""What training frameworks take from ``gradwatch.fixes``: fix records for checkpoints, tree-only
snapshots, a clipper the framework drives (``observe``, ``clip_gradients(attach=False)``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import apply_fixes, replay, snapshot
from gradwatch.fixes.clipping import GradientClipper, attached_clippers, global_norm
from gradwatch.fixes.record import Change, FixRecord, FixReport, to_plain


def _report() -> FixReport:
    structural = Change("insert_batchnorm", "vanishing", targets=["0"], layers=["0.0", "0.1"], structural=True,
                        ops=[{"op": "wrap", "path": "0"}], params_added=["0.1.weight"],
                        details={"gain": torch.tensor(2.0), "shape": (3, 4)})
    return FixReport(changes=[structural, Change("he_init", status="refused", reason="no")])


def test_a_fix_record_is_plain_data_and_reads_back() -> None:
    record = FixRecord("auto_fix", 4, _report())
    data = record.to_dict()
    assert json.loads(json.dumps(data)) == data  # weights_only-safe: only plain types
    assert data["report"]["changes"][0]["details"] == {"gain": 2.0, "shape": [3, 4]}
    back = FixRecord.from_dict(data)
    assert (back.id, back.source, back.step) == (record.id, "auto_fix", 4)
    assert back.structural and back.changes_parameters
    assert record.report.touched_paths() == {"0", "0.0", "0.1"}
    assert FixRecord("preflight", None, FixReport()).id != record.id
    with pytest.raises(ValueError, match="'report'"):
        FixRecord.from_dict({"source": "x"})
    assert to_plain({"a": (1, 2)}) == {"a": [1, 2]}


def test_a_tree_only_snapshot_undoes_structure_without_copying_values() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))
    tree = snapshot(model, tree_only=True)
    before = [name for name, _ in model.named_modules()]
    model[1] = nn.ReLU()
    model.append(nn.Tanh())
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    tree.restore()
    assert [name for name, _ in model.named_modules()] == before and isinstance(model[1], nn.Sigmoid)
    assert bool((model[0].weight == 3.0).all())  # values are not part of a tree-only snapshot


def test_observe_follows_the_norms_without_clipping() -> None:
    layer = nn.Linear(3, 3)
    layer.weight.grad = torch.full_like(layer.weight, 2.0)
    layer.bias.grad = torch.zeros_like(layer.bias)
    grad = layer.weight.grad.clone()
    clipper = GradientClipper("autoclip", percentile=50.0)
    assert math.isinf(clipper.threshold)
    norm = clipper.observe(layer.parameters())
    assert norm == pytest.approx(float(global_norm([grad]))) and list(clipper.history) == [pytest.approx(norm)]
    assert clipper.threshold == pytest.approx(norm) and torch.equal(layer.weight.grad, grad)


def test_clip_gradients_can_leave_the_clipping_to_the_framework() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    diagnosis = Diagnosis(findings=(Finding("exploding", ("0",), "critical", "e", {}, ("clip_gradients",)),))
    report = apply_fixes(model, diagnosis, optimizer=optimizer, only=["clip_gradients"],
                         options={"clip_gradients": {"attach": False, "max_norm": 0.5}})
    [clipper] = report.clippers
    assert report.applied[0].fix == "clip_gradients" and "not attached" in report.applied[0].optimizer
    assert not clipper.attached and attached_clippers(optimizer) == [] and clipper.threshold == 0.5
    assert replay(nn.Sequential(nn.Linear(3, 3)), report) == []  # nothing structural to rebuild
