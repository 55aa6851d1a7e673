"""Core hooks used by framework integrations: ``forward_done``, ``note_optimizers``, ``scale_rows``,
wrapper-free layer names (``torch.compile``), ``reduce_sharded_rows`` replica counts."""

from __future__ import annotations

import torch
from torch import nn

import gradwatch
from gradwatch.collect import GRAD_METRICS, reduce_sharded_rows, scale_rows
from gradwatch.layers import clean_name, discover_layers


class _Outer(nn.Module):
    """A container whose own forward is never called: training code calls ``outer.net(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _train(model: nn.Module, watcher: gradwatch.GradWatcher, steps: int, call: nn.Module | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        (call or model)(torch.randn(16, 6)).square().mean().backward()
        watcher.forward_done()
        watcher.step()
        opt.step()
        opt.zero_grad()


def test_forward_done_ends_one_shot_hooks_when_the_root_forward_never_runs() -> None:
    outer = _Outer()
    watcher = gradwatch.watch(outer, activation_every_n_steps=2)
    _train(outer, watcher, 4, call=outer.net)
    assert watcher.structure["order"][:3] == ["net.0", "net.1", "net.2"]
    df = watcher.to_dataframe()
    assert sorted(df[df.metric == "dead_frac"].step.unique()) == [0, 2]
    watcher.close()
    assert not any(m._forward_hooks for m in outer.modules())


def test_forward_done_is_a_no_op_when_the_root_forward_ran() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    watcher = gradwatch.watch(model, activation_every_n_steps=1)
    _train(model, watcher, 3)
    assert len(watcher.to_dataframe().query("metric == 'dead_frac'")) == 3
    watcher.close()


def test_note_optimizers_sets_the_diagnosis_context() -> None:
    model = nn.Linear(3, 3)
    watcher = gradwatch.watch(model)
    watcher.note_optimizers(torch.optim.Adam(model.parameters()))
    assert watcher.history.context["optimizer"] == "Adam" and watcher.history.context["optimizer_scale_invariant"] is True
    watcher.note_optimizers(torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=1))
    assert watcher.history.context["optimizer"] == "Adam, SGD"
    assert watcher.history.context["optimizer_scale_invariant"] is False
    watcher.close()


def test_scale_rows_matches_statistics_of_scaled_gradients() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))

    def collect(scale: float, factor: float | None) -> torch.Tensor:
        watcher = gradwatch.watch(model, activations=False)
        if factor is not None:
            watcher.row_reducer = lambda rows: scale_rows(rows, factor)
        torch.manual_seed(0)
        model.zero_grad()
        (model(torch.randn(4, 6)).square().mean() * scale).backward()
        watcher.step()
        watcher.close()
        return torch.from_numpy(watcher.history.view().grad[0])

    seen = [collect(1.0, None), collect(512.0, 1 / 512)]
    for metric in ("grad_norm", "grad_mean_abs", "grad_max_abs", "grad_to_weight", "weight_norm"):
        i = GRAD_METRICS.index(metric)
        torch.testing.assert_close(seen[1][:, i], seen[0][:, i], rtol=1e-6, atol=0)


def test_reduce_sharded_rows_without_process_group_is_identity() -> None:
    rows = torch.rand(8, 3)
    assert reduce_sharded_rows(rows, replicas=torch.tensor([1.0, 2.0, 2.0])) is rows


def test_compiled_submodules_are_named_without_orig_mod() -> None:
    assert clean_name("net._orig_mod.0") == "net.0"
    assert clean_name("a._fsdp_wrapped_module.b._checkpoint_wrapped_module.c") == "a.b.c"
    assert clean_name("my_orig_mod_layer.0") == "my_orig_mod_layer.0"
    outer = _Outer()
    outer.net = torch.compile(outer.net, backend="eager")
    assert [layer.name for layer in discover_layers(outer)] == ["net.0", "net.2"]
    compiled_root = torch.compile(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), backend="eager")
    watcher = gradwatch.watch(compiled_root, activations=False)
    _train(compiled_root, watcher, 2)
    assert set(watcher.to_dataframe().layer) == {"0", "2", "(total)"}
    watcher.close()


def test_hook_optimizer_false_keeps_step_manual() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = gradwatch.watch(model, optimizer=opt, hook_optimizer=False, activations=False)
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step()  # not hooked: collects nothing
    assert watcher.collected == 0
    watcher.step(global_step=7)
    assert watcher.collected == 1 and list(watcher.history.view().steps) == [7]
    assert watcher.optimizer is opt
    watcher.close()
