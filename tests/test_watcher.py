"""GradWatcher on real models: healthy controls, real problems, bad input, clean teardown."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from gw_testing import (
    PreLNTransformer,
    SmallResNet,
    image_task,
    mlp,
    scale_init,
    token_task,
    train,
    vector_task,
)
from torch import nn

import gradwatch


def watched_run(model, task, steps=40, **kw):
    opt_cls = kw.pop("opt_cls", torch.optim.SGD)
    lr = kw.pop("lr", 0.05)
    loss_scale = kw.pop("loss_scale", 1.0)
    opt = opt_cls(model.parameters(), lr=lr)
    kw.setdefault("activation_every_n_steps", 10)
    with gradwatch.watch(model, optimizer=opt, on_error="raise", **kw) as w:
        train(model, task, steps, watcher=w, opt=opt, loss_scale=loss_scale)
        diag = w.diagnose()
    return w, diag


@pytest.mark.parametrize("loss_scale", [1.0, 1e-6])
def test_healthy_controls_are_healthy(loss_scale: float) -> None:
    for model, task, opt_cls, lr in (
        (SmallResNet(), image_task(), torch.optim.SGD, 0.05),
        (PreLNTransformer(), token_task(), torch.optim.Adam, 1e-3),
        (mlp(nn.ReLU, 3), vector_task(), torch.optim.SGD, 0.05),
    ):
        _, diag = watched_run(model, task, opt_cls=opt_cls, lr=lr, loss_scale=loss_scale)
        assert diag.healthy, f"{type(model).__name__} (loss x {loss_scale}):\n{diag}"


def test_deep_sigmoid_mlp_is_vanishing_naming_its_early_layers() -> None:
    model = mlp(nn.Sigmoid, 12)
    _, diag = watched_run(model, vector_task())
    (f,) = diag.by_kind("vanishing")
    assert f.layers[0] == "0" and "22" not in f.layers
    assert f.fixes[:2] == ("insert_batchnorm", "swap_activation") and "clip_gradients" not in f.fixes
    assert "1" in f.evidence["activations"]
    text = str(diag)
    assert "vanishing" in text and "Linear" in text


def test_overscaled_relu_under_adam_is_exploding_with_he_init_first() -> None:
    model = scale_init(mlp(nn.ReLU, 8, width=64), 3.0)
    _, diag = watched_run(model, vector_task(), opt_cls=torch.optim.Adam, lr=1e-3)
    f = diag.by_kind("exploding")[0]
    assert f.fixes[0] == "he_init" and "clip_gradients" not in f.fixes
    assert "vanishing" not in diag.kinds()


def test_nan_injected_at_step_k_is_nonfinite_at_step_k() -> None:
    model = mlp(nn.ReLU, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gradwatch.watch(model, on_error="raise")

    def inject(step: int) -> None:
        if step == 7:
            model[2].weight.grad[0, 0] = math.nan

    train(model, vector_task(), 12, watcher=w, opt=opt, before_step=inject)
    (f,) = w.diagnose().by_kind("nonfinite")
    assert f.evidence["first_step"] == 7 and f.layers == ("2",)
    w.close()


def test_dead_relu_layer_is_found() -> None:
    model = mlp(nn.ReLU, 4)
    with torch.no_grad():
        model[2].bias.fill_(-20.0)
    _, diag = watched_run(model, vector_task(), steps=20)
    (f,) = diag.by_kind("dead_units")
    assert f.layers == ("3",) and f.evidence["feeding_layers"] == ["2"]


def test_forward_order_defines_depth() -> None:
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(8, 4)
            self.hidden = nn.Linear(8, 8)
            self.inp = nn.Linear(16, 8)

        def forward(self, x):
            return self.out(torch.relu(self.hidden(torch.relu(self.inp(x)))))

    model = Backwards()
    w, _ = watched_run(model, vector_task(), steps=3)
    assert [layer.name for layer in w.layers] == ["inp", "hidden", "out"]
    assert list(w.summary().index) == ["inp", "hidden", "out"]


def test_every_n_steps_and_dataframe() -> None:
    model = mlp(nn.ReLU, 3)
    w = gradwatch.watch(model, every_n_steps=3, on_error="raise")
    train(model, vector_task(), 10, watcher=w)
    df = w.to_dataframe()
    assert sorted(df.step.unique()) == [0, 3, 6, 9]
    assert {"grad_norm", "grad_to_weight", "grad_max_abs", "nonfinite"} <= set(df.metric)
    assert set(df.columns) >= {"step", "layer", "metric", "value"}
    w.close()


def test_optimizer_hook_collects_after_accumulation_once_per_step() -> None:
    model = mlp(nn.ReLU, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gradwatch.watch(model, optimizer=opt, on_error="raise")
    task = vector_task()
    for step in range(3):
        for micro in range(4):
            x, y = task(step * 4 + micro)
            F.cross_entropy(model(x), y).backward()
        expected = float(model[0].weight.grad.double().norm().hypot(model[0].bias.grad.double().norm()))
        opt.step()
        opt.zero_grad()
        got = w.to_dataframe().query("layer == '0' and metric == 'grad_norm'").value.iloc[-1]
        assert got == pytest.approx(expected, rel=1e-5)
    assert w.collected == 3
    w.close()
    assert not opt._optimizer_step_pre_hooks


def test_activation_hooks_exist_only_around_sampled_steps() -> None:
    model = mlp(nn.ReLU, 3)
    w = gradwatch.watch(model, activation_every_n_steps=5, on_error="raise")
    task = vector_task()
    armed = []
    for step in range(10):
        armed.append(any(m._forward_hooks for m in model.modules() if m is not model))
        x, y = task(step)
        F.cross_entropy(model(x), y).backward()
        w.step()
        model.zero_grad()
    assert armed == [True, False, False, False, False, True, False, False, False, False]
    w.close()


# -- bad input ------------------------------------------------------------------------------------
def test_model_without_parameters_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        gradwatch.watch(nn.ReLU())
    with pytest.raises(TypeError, match="nn.Module"):
        gradwatch.watch("model")
    with pytest.raises(TypeError, match="unexpected keyword"):
        gradwatch.watch(nn.Linear(2, 2), every_n_step=3)
    with pytest.raises(ValueError, match="every_n_steps"):
        gradwatch.watch(nn.Linear(2, 2), every_n_steps=0)


def test_frozen_model_warns_and_stays_healthy(caplog: pytest.LogCaptureFixture) -> None:
    model = mlp(nn.ReLU, 3)
    model.requires_grad_(False)
    model[4].requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        w = gradwatch.watch(nn.Sequential(nn.Linear(2, 2)).requires_grad_(False), on_error="raise")
    assert "frozen" in caplog.text
    w.close()
    w = gradwatch.watch(model, on_error="raise")
    train(model, vector_task(), 10, watcher=w, opt=torch.optim.SGD(model[4].parameters(), lr=0.1))
    d = w.diagnose()
    assert d.healthy and any("no gradient" in n for n in d.notes)
    w.close()


def test_step_before_backward_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    w = gradwatch.watch(nn.Linear(3, 3), on_error="raise")
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        w.step()
        w.step()
    assert caplog.text.count("no gradients") == 1
    assert w.diagnose().healthy
    w.close()


def test_watching_twice_and_closing_twice() -> None:
    model = nn.Linear(3, 3)
    w = gradwatch.watch(model)
    with pytest.raises(RuntimeError, match="already watched"):
        gradwatch.watch(model)
    w.close()
    w.close()
    gradwatch.watch(model).close()


def test_close_leaves_the_model_exactly_as_it_was() -> None:
    model = SmallResNet()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]
    w = gradwatch.watch(model, on_error="raise")
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    w.close()
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
    assert hooks == [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]


def test_sparse_complex_and_new_layers() -> None:
    class Grows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8, sparse=True)
            self.head = nn.Linear(8, 4)
            self.extra: nn.Module | None = None

        def forward(self, x):
            h = self.emb(x).mean(1)
            if self.extra is not None:
                h = self.extra(h)
            return self.head(h)

    model = Grows()
    w = gradwatch.watch(model, on_error="raise", slow_stats_every_n=1)
    task = token_task()
    for step in range(6):
        if step == 3:
            model.extra = nn.Linear(8, 8)
        x, y = task(step)
        F.cross_entropy(model(x), y).backward()
        w.step()
        model.zero_grad()
    df = w.to_dataframe()
    assert "extra" in set(df.layer) and "emb" in set(df.layer)
    assert df.query("layer == 'emb' and metric == 'grad_norm'").value.gt(0).all()
    w.close()

    lin = nn.Linear(3, 2).to(torch.complex64)
    with gradwatch.watch(lin, on_error="raise") as w:
        lin(torch.randn(4, 3, dtype=torch.complex64)).abs().sum().backward()
        w.step()
        assert w.to_dataframe().query("metric == 'grad_norm'").value.gt(0).all()


def test_low_precision_parameters_give_float32_statistics() -> None:
    model = mlp(nn.ReLU, 3).to(torch.bfloat16)
    with gradwatch.watch(model, on_error="raise") as w:
        x, y = vector_task()(0)
        F.cross_entropy(model(x.bfloat16()).float(), y).backward()
        w.step()
        df = w.to_dataframe()
    assert df.value.map(math.isfinite).all()


def test_internal_failure_detaches_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    model = mlp(nn.ReLU, 3)
    w = gradwatch.watch(model)
    train(model, vector_task(), 1, watcher=w)
    w.collector.compute_on_device = None  # break the watcher itself, not the model
    with caplog.at_level(logging.ERROR, logger="gradwatch"):
        train(model, vector_task(), 3, watcher=w)
    assert w.collected == 1
    assert w.error and caplog.text.count("detached") == 1
    assert all(not m._forward_hooks for m in model.modules())
    w.close()


def test_compiled_module_names_have_no_prefix() -> None:
    model = mlp(nn.ReLU, 3)
    compiled = torch.compile(model)
    with gradwatch.watch(compiled) as w:
        assert [layer.name for layer in w.layers] == ["0", "2", "4"]


class _SeqClassifier(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(1, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def test_vanishing_through_time_in_a_plain_rnn_recommends_lstm_gru() -> None:
    model = _SeqClassifier(nn.RNN)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, optimizer=opt, activation_every_n_steps=5, on_error="raise") as w:
        for _ in range(15):
            x = torch.randn(16, 60, 1, generator=g)
            F.cross_entropy(model(x), (x[:, 0, 0] > 0).long()).backward()
            opt.step()
            opt.zero_grad()
        diag = w.diagnose()
    (f,) = diag.by_kind("vanishing")
    assert f.layers == ("rnn",) and f.fixes == ("lstm_gru",) and f.evidence["decades"] > 3
    assert "first time steps" in f.message


def test_sampling_the_rnn_input_gradient_does_not_change_parameter_gradients() -> None:
    x = torch.randn(4, 20, 1)

    def grads(watched: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        model = _SeqClassifier(nn.GRU)
        w = gradwatch.watch(model, activation_every_n_steps=1, on_error="raise") if watched else None
        model(x).sum().backward()
        if w is not None:
            w.step()
            assert w.to_dataframe().query("metric == 'time_decay_decades'").value.notna().any()
            w.close()
        return [p.grad.clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(grads(False), grads(True), strict=True))
