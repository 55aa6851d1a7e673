"""replay: a fresh model gets the fixed structure; bad records are rejected before anything changes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import RecordError, apply_fixes, replay
from gradwatch.layers import observe_structure


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid()
        )
        self.rnn = nn.RNN(8, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.body(x)
        out, _ = self.rnn(h.unsqueeze(1))
        return self.head(out[:, -1])


def _fixed() -> tuple[Net, dict]:
    torch.manual_seed(0)
    model = Net()
    diagnosis = Diagnosis(
        findings=(
            Finding("vanishing", ("body.2", "body.4"), "critical", "v", {}, ("residual",)),
            Finding("saturation", ("body.1", "body.5"), "warning", "s", {"feeding_layers": ["body.0", "body.4"]},
                    ("insert_batchnorm",)),
            Finding("vanishing", ("body.0",), "critical", "v", {"activations": ["body.1", "body.3", "body.5"]},
                    ("swap_activation",)),
            Finding("vanishing", ("rnn",), "critical", "t", {}, ("lstm_gru",)),
        ),
        structure=observe_structure(Net(), torch.randn(3, 4)),
    )
    report = apply_fixes(model, diagnosis, optimizer=torch.optim.Adam(model.parameters()))
    assert all(c.status == "applied" for c in report.changes), str(report)
    return model, json.loads(report.to_json())


def _state(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def test_chained_structural_changes_replay_in_order_and_load_strictly():
    model, record = _fixed()
    # residual wrapped body.2-3 and body.4-5; the norm then went after body.0 and inside the block at body.4;
    # the swap then reached the Sigmoids where they had moved to.
    assert isinstance(model.body[4].block[0], nn.Sequential)
    assert isinstance(model.body[2].block[1], nn.ReLU) and isinstance(model.body[4].block[1], nn.ReLU)
    fresh = Net()
    ops = replay(fresh, record)
    assert [op["op"] for op in ops] == ["wrap_residual"] * 2 + ["wrap_norm"] * 2 + ["replace_activation"] * 3 + ["swap_rnn"]
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    fresh.eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-6, atol=1e-7)  # same weights; BLAS may differ in the last bit


def test_replay_accepts_a_report_a_dict_or_json():
    model, record = _fixed()
    for form in (record, json.dumps(record)):
        fresh = Net()
        replay(fresh, form)
        fresh.load_state_dict(model.state_dict(), strict=True)


def _broken(record: dict, change: int, **op_changes) -> dict:
    bad = copy.deepcopy(record)
    structural = [c for c in bad["changes"] if c["structural"] and c["status"] == "applied"]
    structural[change]["ops"][-1].update(op_changes)
    return bad


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: {**r, "version": 99}, "version 99 is not supported"),
        (lambda r: {**r, "changes": "all"}, "must be a list"),
        (lambda r: {**r, "changes": [{**r["changes"][0], "colour": 1}]}, "unknown Change fields \\['colour'\\]"),
        (lambda r: _broken(r, 3, op="explode"), "unknown op 'explode'; allowed"),
        (lambda r: _broken(r, 2, new="Swish"), "new='Swish'; allowed"),
        (lambda r: _broken(r, 1, num_features="eight"), "num_features='eight'"),
        (lambda r: _broken(r, 3, path="decoder.rnn"), "no submodule 'decoder.rnn'"),
        (lambda r: _broken(r, 3, expect="GRU"), "expects 'GRU' there, found 'RNN'"),
    ],
)
def test_bad_records_are_rejected_before_anything_changes(mutate, message):
    _, record = _fixed()
    fresh = Net()
    before = _state(fresh)
    with pytest.raises(RecordError, match=message):
        replay(fresh, mutate(record))
    assert repr(fresh) == before[0]
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before[1].items())


def test_a_record_for_another_model_is_rejected_whole():
    _, record = _fixed()
    other = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid())
    tree = repr(other)
    with pytest.raises(RecordError, match="no submodule"):
        replay(other, record)
    assert repr(other) == tree


def test_not_json():
    with pytest.raises(RecordError, match="not valid JSON"):
        replay(Net(), "{oops")
