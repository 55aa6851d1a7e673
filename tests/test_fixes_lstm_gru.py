"""lstm_gru: same sizes and flags, call sites keep working, new weights recorded, optimizer updated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import LSTMAsRNN, apply_fixes, get_fix


class Tagger(nn.Module):
    """Calls its RNN the nn.RNN way: with an initial state, unpacking (output, h_n)."""

    def __init__(self, bidirectional: bool = True):
        super().__init__()
        self.rnn = nn.RNN(3, 5, num_layers=2, batch_first=True, bidirectional=bidirectional, dropout=0.1)
        self.head = nn.Linear(10 if bidirectional else 5, 2)

    def forward(self, x, h0=None):
        out, h_n = self.rnn(x, h0)
        assert h_n.shape[-1] == 5
        return self.head(out)


FINDING = Finding("vanishing", ("rnn", "head"), "critical", "through time", {}, ("lstm_gru",))


@pytest.mark.parametrize("to", ["gru", "lstm"])
def test_same_sizes_and_flags_and_call_sites_still_work(to):
    torch.manual_seed(0)
    model = Tagger()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4, 3)).sum().backward()
    optimizer.step()
    old = list(model.rnn.parameters())
    head_state = {k: v.clone() for k, v in optimizer.state[model.head.weight].items()}

    report = apply_fixes(model, Diagnosis(findings=(FINDING,)), optimizer=optimizer, options={"lstm_gru": {"to": to}})

    change = report.changes[0]
    rnn = model.rnn
    assert type(rnn) is (nn.GRU if to == "gru" else LSTMAsRNN)
    assert (rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.batch_first, rnn.bidirectional, rnn.dropout) == (
        3, 5, 2, True, True, 0.1
    )
    assert change.targets == ["rnn"] and "not an nn.RNN" in change.refused["head"]
    assert "new weights" in change.reason and change.details["new_weights"] is True
    assert change.params_removed and change.params_added
    assert all(p not in optimizer.state for p in old)
    assert not any(p is q for g in optimizer.param_groups for p in g["params"] for q in old)
    assert all(torch.equal(optimizer.state[model.head.weight][k], v) for k, v in head_state.items())
    h0 = torch.zeros(4, 2, 5)
    out = model(torch.randn(2, 4, 3), h0)
    assert out.shape == (2, 4, 2)
    out.sum().backward()
    optimizer.step()


def test_lstm_adapter_returns_output_and_h_n_like_rnn_with_forget_bias_one():
    lstm = LSTMAsRNN(3, 4, batch_first=True)
    out, h_n = lstm(torch.randn(2, 5, 3))
    assert out.shape == (2, 5, 4) and h_n.shape == (1, 2, 4)
    assert torch.equal(lstm.bias_ih_l0[4:8], torch.ones(4)) and torch.equal(lstm.bias_hh_l0[4:8], torch.zeros(4))
    reference = nn.LSTM(3, 4, batch_first=True)
    reference.load_state_dict(lstm.state_dict())
    x, h0 = torch.randn(2, 5, 3), torch.randn(1, 2, 4)
    expected, (h_ref, _) = reference(x, (h0, torch.zeros_like(h0)))
    got, h_got = lstm(x, h0)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(h_got, h_ref)


def test_gated_cells_and_other_layers_are_refused():
    model = nn.ModuleDict({"lstm": nn.LSTM(2, 2), "gru": nn.GRU(2, 2)})
    report = apply_fixes(model, Diagnosis(findings=(Finding("vanishing", ("lstm", "gru"), "critical", "t", {}, ("lstm_gru",)),)))
    change = report.changes[0]
    assert change.status == "refused"
    assert "LSTM is not an nn.RNN" in change.refused["lstm"] and "GRU is not an nn.RNN" in change.refused["gru"]


def test_bad_target():
    with pytest.raises(ValueError, match="allowed: \\('gru', 'lstm'\\)"):
        get_fix("lstm_gru", to="transformer")


def test_gru_update_gate_starts_biased_towards_keeping_the_state_and_the_code_says_so():
    model = Tagger()
    report = apply_fixes(model, Diagnosis(findings=(FINDING,)))
    for name, param in model.rnn.named_parameters():
        if name.startswith("bias_ih"):
            assert torch.equal(param[5:10], torch.full((5,), 2.0)), name
        if name.startswith("bias_hh"):
            assert torch.equal(param[5:10], torch.zeros(5)), name
    assert report.changes[0].code[1] == "keep_gate_bias_(model.rnn, 2.0)"
    assert "from gradwatch.fixes import keep_gate_bias_" in report.changes[0].imports
    lstm = Tagger()
    apply_fixes(lstm, Diagnosis(findings=(FINDING,)), options={"lstm_gru": {"to": "lstm", "gate_bias": 3.0}})
    assert torch.equal(lstm.rnn.bias_ih_l1_reverse[5:10], torch.full((5,), 3.0))
