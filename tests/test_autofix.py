"""Auto-fix during training: apply once after probing, verify, roll back what made things worse."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from gw_testing import mlp, scale_init, vector_task
from torch import nn

import gradwatch
from gradwatch.autofix import AutoFixer
from gradwatch.fixes.he_init import HeInit
from gradwatch.fixes.registry import _REGISTRY


def run(model, opt, w, steps, task=None, stop=None):
    task = task or vector_task()
    for i in range(steps):
        x, y = task(i)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        w.step(loss)
        opt.step()
        opt.zero_grad()
        if stop is not None and stop():
            break


def test_helpful_fix_is_applied_verified_and_kept() -> None:
    model = mlp(nn.Sigmoid, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, optimizer=opt, auto_fix=True, auto_fix_probe_steps=20, auto_fix_verify_steps=30,
                         on_error="raise") as w:
        run(model, opt, w, 60)
        actions = [e.action for e in w.autofixer.events]
        assert actions == ["applied", "kept"]
        assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
        assert "vanishing" not in w.diagnose(w.thresholds.updated(window=30)).kinds()
        applied = w.autofixer.events[0].report
        assert {c.fix for c in applied.applied} == {"insert_batchnorm"}


class ZeroingHeInit(HeInit):
    """A deliberately harmful he_init: zeroes the layers it should re-initialise."""

    def execute(self, ctx, plan, change):
        super().execute(ctx, plan, change)
        with torch.no_grad():
            for name in plan.targets:
                ctx.modules[name].weight.zero_()


def test_harmful_fix_is_rolled_back_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_REGISTRY, "he_init", ZeroingHeInit)
    model = mlp(nn.Sigmoid, 10)  # vanishing: he_init is one of the recommended fixes
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    w = gradwatch.watch(model, optimizer=opt, on_error="raise")
    before: dict = {}

    def capture_before(watcher, step):
        if watcher.collected + 1 == fixer.probe_steps and not before:
            before["model"] = copy.deepcopy(model.state_dict())
            before["opt"] = copy.deepcopy(opt.state_dict())
            before["grads"] = [p.grad.clone() for p in model.parameters()]

    w.add_step_callback(capture_before)
    # alpha = 50 makes every wrapped block 50x louder: a deliberately harmful residual fix
    fixer = AutoFixer(w, ("he_init",), probe_steps=10, verify_steps=10)
    after: dict = {}

    def capture_after(optimizer, args, kwargs):
        if fixer.events and fixer.events[-1].action == "rolled_back" and not after:
            after["model"] = copy.deepcopy(model.state_dict())
            after["opt"] = copy.deepcopy(opt.state_dict())
            after["grads"] = [p.grad.clone() for p in model.parameters()]
            after["types"] = [type(m).__name__ for m in model]

    opt.register_step_pre_hook(capture_after)
    run(model, opt, w, 25)
    actions = [e.action for e in fixer.events]
    assert actions == ["applied", "rolled_back"], fixer.events
    assert after["types"] == [type(m).__name__ for m in model] and "Sigmoid" in after["types"]
    assert before["model"].keys() == after["model"].keys()
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert all(torch.equal(a, b) for a, b in zip(before["grads"], after["grads"], strict=True))
    assert before["opt"]["param_groups"] == after["opt"]["param_groups"]
    for k, state in before["opt"]["state"].items():
        assert all(torch.equal(v, after["opt"]["state"][k][n]) for n, v in state.items() if isinstance(v, torch.Tensor))
    w.close()


def test_clipping_engages_on_exploding_gradients_and_its_threshold_is_logged() -> None:
    model = scale_init(mlp(nn.ReLU, 6, width=64), 3.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    with gradwatch.watch(model, optimizer=opt, auto_fix=["clip_gradients"], auto_fix_probe_steps=10,
                         diagnose_every_n_steps=10, on_error="raise") as w:
        run(model, opt, w, 30)
        assert [e.action for e in w.autofixer.events if e.action == "clipping"] == ["clipping"]
        assert "clip_threshold" in w._step_recorder.extra
        assert w.autofixer.state == "verifying"  # clipping is verified like every other fix
        run(model, opt, w, 60)
        assert [e.action for e in w.autofixer.events][-2:] in (["clipping", "kept"], ["clipping", "rolled_back"])
        assert "loss_after" in w.autofixer.events[-1].evidence


def test_clipping_that_leaves_the_loss_worse_is_removed_and_the_model_restored() -> None:
    torch.manual_seed(0)
    model = scale_init(mlp(nn.ReLU, 6, width=64), 3.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    base = vector_task()

    def drifting(i):  # the inputs grow over time: a ReLU net's logits (and loss) grow with them, clipped or not
        x, y = base(i)
        return x * (1 + i / 3), y

    with gradwatch.watch(model, optimizer=opt, auto_fix=["clip_gradients"], auto_fix_probe_steps=10,
                         auto_fix_verify_steps=20, diagnose_every_n_steps=10, on_error="raise") as w:
        run(model, opt, w, 10, task=drifting)
        (clip_event,) = [e for e in w.autofixer.events if e.action == "clipping"]
        assert gradwatch.fixes.attached_clippers(opt)
        run(model, opt, w, 25, task=drifting)
        verdict = w.autofixer.events[-1]
        assert verdict.action == "rolled_back", [e.to_dict() for e in w.autofixer.events]
        assert verdict.evidence["loss_after"] > verdict.evidence["loss_before"]
        assert not gradwatch.fixes.attached_clippers(opt)  # the clipping hook is gone
        assert clip_event.step < verdict.step


def test_auto_fix_true_never_applies_opt_in_fixes() -> None:
    model = mlp(nn.ReLU, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, optimizer=opt, auto_fix=True) as w:
        assert "skip_spikes" not in w.auto_fix and "clip_gradients" in w.auto_fix


def test_healthy_model_is_left_alone_bitwise() -> None:
    def train(auto: bool) -> dict:
        torch.manual_seed(0)
        model = mlp(nn.ReLU, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        w = gradwatch.watch(model, optimizer=opt, auto_fix=auto, auto_fix_probe_steps=5, on_error="raise")
        run(model, opt, w, 20)
        if auto:
            assert [e.action for e in w.autofixer.events] == ["nothing"]
        w.close()
        return model.state_dict()

    a, b = train(False), train(True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_fix_needs_an_optimizer_and_known_names() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        gradwatch.watch(nn.Linear(2, 2), auto_fix=True)
    with pytest.raises(ValueError, match="unknown fix"):
        gradwatch.watch(nn.Linear(2, 2), optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), auto_fix=["magic"])


def test_auto_fix_is_written_to_tensorboard_text(tmp_path) -> None:
    model = mlp(nn.Sigmoid, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, optimizer=opt, log_dir=tmp_path, auto_fix=["insert_batchnorm"],
                         auto_fix_probe_steps=10, auto_fix_verify_steps=10, on_error="raise") as w:
        run(model, opt, w, 25)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    texts = acc.Tensors("gradwatch/auto_fix/text_summary")
    assert [t.step for t in texts] == [9, 19]
    assert b"applied" in texts[0].tensor_proto.string_val[0] and b"kept" in texts[1].tensor_proto.string_val[0]


def test_recurrent_over_scaling_under_adam_gets_no_automatic_clipping() -> None:
    # the exploding_rnn reference model, trained with Adam: Adam is invariant to gradient scale, so the
    # finding ranks the cures (recurrent_init, lstm_gru, lower_lr) before any clipping and the auto-fixer
    # must not engage (and keep) clipping
    from gradwatch import models

    case = models.create("exploding_rnn", seed=0)
    opt = torch.optim.Adam(case.model.parameters(), lr=1e-3)
    with gradwatch.watch(case.model, optimizer=opt, auto_fix=True, auto_fix_probe_steps=10,
                         diagnose_every_n_steps=10, activations=False, on_error="raise") as w:
        for t in range(40):
            x, y = case.batch(t)
            loss = case.loss_fn(case.model(x), y)
            loss.backward()
            w.step(loss)
            opt.step()
            opt.zero_grad()
        diag = w.diagnose()
    (f,) = diag.by_kind("exploding")
    assert f.fixes[0] == "recurrent_init" and "clip_gradients" not in f.fixes[:3], f.fixes
    assert not any(e.action == "clipping" for e in w.autofixer.events), [e.to_dict() for e in w.autofixer.events]
    assert not gradwatch.fixes.attached_clippers(opt)
