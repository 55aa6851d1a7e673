"""Structural performance properties (no timings): what a step does, not how long it takes.

- a collected step copies device data to the host exactly once (``Tensor.cpu``, ``tolist`` and
  every scalar read -- ``item()``, ``float(t)``, ``bool(t)`` -- are counted);
- a step skipped by ``every_n_steps`` copies nothing and finds no hook on the model;
- forward hooks exist only during the forward pass of a step that samples activations;
- the statistics are batched: their number of torch ops does not grow with the number of
  (equally shaped) layers;
- a step's work does not grow with the length of the history;
- the accelerator hot path (forced on CPU tensors with ``hot_path="accelerator"``) never waits for
  the device: no scalar read, blocking host copy, ``.cpu()``, ``.tolist()`` or ``bool()`` of a
  tensor on any kind of step, one ``non_blocking`` copy each; its delayed values equal the host
  path's and are never lost (close, exception);
- the all-reduce of sharded statistic rows (FSDP) reads nothing back either: another rank's failure
  reaches a watcher inside the rows it reads later, and a stopped watcher keeps joining the reduction.

Timings live in ``benchmarks/overhead.py``.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from gw_testing import SmallResNet, mlp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch
from gradwatch.collect import GradientCollector
from gradwatch.layers import discover_layers


class _Ops(TorchDispatchMode):
    """Counts aten ops, and scalar reads (``_local_scalar_dense``: ``item()``, ``float(t)``, ``bool(t)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.scalar_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        return func(*args, **(kwargs or {}))


class HostCopies:
    """Device-to-host transfers made while active: ``.cpu()``/``.tolist()`` calls plus scalar reads."""

    def __init__(self) -> None:
        self.copies = 0
        self.mode = _Ops()

    @property
    def total(self) -> int:
        return self.copies + self.mode.scalar_reads


@contextmanager
def count_host_copies(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostCopies]:
    counter = HostCopies()
    cpu, tolist = torch.Tensor.cpu, torch.Tensor.tolist

    def counted_cpu(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        counter.copies += 1
        return cpu(self, *args, **kwargs)

    def counted_tolist(self: torch.Tensor) -> object:
        counter.copies += 1
        return tolist(self)

    # (``t.to(device)`` is not counted: on a CPU-only machine it cannot tell a copy to the host
    # from a move to the gradients' own device; gradwatch copies to the host with ``.cpu()`` only)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "cpu", counted_cpu)
        m.setattr(torch.Tensor, "tolist", counted_tolist)
        with counter.mode:
            yield counter


def forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def tensor_hooks(model: nn.Module) -> int:
    return sum(len(p._backward_hooks or {}) for p in model.parameters())


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               after_backward: Callable[[torch.Tensor], None] | None = None) -> None:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if after_backward is not None:
        after_backward(loss)
    opt.step()


def image_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_a_plain_step_makes_no_host_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # the baseline the other counts are measured against: the model and optimizer alone never sync
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = image_batch()
    train_step(model, opt, x, y)
    with count_host_copies(monkeypatch) as c:
        for _ in range(3):
            train_step(model, opt, x, y)
    assert c.total == 0


@pytest.mark.parametrize("slow_stats_every_n", [1, 3])
def test_one_host_copy_per_collected_step(monkeypatch: pytest.MonkeyPatch, slow_stats_every_n: int) -> None:
    # a real model with BatchNorm and ReLU activations; every kind of step: slow statistics, the
    # step after one (update ratio), activation samples (hooks in forward and backward), diagnosis
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = image_batch()
    watcher = gradwatch.watch(model, slow_stats_every_n=slow_stats_every_n, activation_every_n_steps=2,
                              diagnose_every_n_steps=4, on_error="raise")
    train_step(model, opt, x, y, watcher.step)  # first step: forward order, plans (host -> device only)
    for step in range(1, 9):
        with count_host_copies(monkeypatch) as c:
            train_step(model, opt, x, y, watcher.step)  # the loss tensor rides along in the same copy
        assert c.total == 1, (step, c.copies, c.mode.scalar_reads)
    assert watcher.collected == 9 and watcher.error is None
    df = watcher.to_dataframe()
    assert {"grad_norm", "grad_max_abs", "grad_mean_abs", "update_ratio", "act_rms", "out_grad_rms"} <= set(df.metric)
    watcher.close()


def test_histogram_steps_add_exactly_one_copy(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    model = mlp(nn.ReLU, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
    watcher = gradwatch.watch(model, log_dir=tmp_path, histogram_every_n_steps=2, activations=False,
                              figure_every_n_steps=0, diagnose_every_n_steps=0, on_error="raise")
    train_step(model, opt, x, y, watcher.step)
    counts = []
    for _ in range(4):  # collected indices 1..4: histograms on 2 and 4
        with count_host_copies(monkeypatch) as c:
            train_step(model, opt, x, y, watcher.step)
        counts.append(c.total)
    watcher.close()
    assert counts == [1, 2, 1, 2]


def test_steps_that_are_not_collected_copy_nothing_and_find_no_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = image_batch()
    watcher = gradwatch.watch(model, every_n_steps=3, activation_every_n_steps=1, on_error="raise")
    for call in range(12):
        hooks_before_forward = forward_hooks(model) + tensor_hooks(model)
        with count_host_copies(monkeypatch) as c:
            train_step(model, opt, x, y, watcher.step)
        if call % 3:
            assert hooks_before_forward == 0, call
            assert c.total == 0, call
        else:
            assert hooks_before_forward > 0, call  # every collected step samples here
            if call:
                assert c.total == 1, call
    assert watcher.collected == 4
    # the sample of each collected step comes from that step's own forward pass
    assert sorted(watcher.to_dataframe().query("metric == 'act_rms'").step.unique()) == [0, 3, 6, 9]
    watcher.close()
    assert forward_hooks(model) == 0 and tensor_hooks(model) == 0


def test_forward_hooks_exist_only_during_sampled_steps() -> None:
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = image_batch()
    watcher = gradwatch.watch(model, activation_every_n_steps=4, on_error="raise")
    seen_during_forward: list[int] = []
    # a pre-hook of our own (minus itself) sees what is attached when each forward pass starts
    handle = model.register_forward_pre_hook(lambda m, a: seen_during_forward.append(forward_hooks(m) - 1))
    for _ in range(10):
        train_step(model, opt, x, y, watcher.step)
    handle.remove()
    watcher.close()
    sampled = [n > 0 for n in seen_during_forward]
    # step 0 also records the forward order; then hooks only on collected indices 4 and 8
    assert sampled == [True, False, False, False, True, False, False, False, True, False]
    assert forward_hooks(model) == 0


def _collector_ops(depth: int, slow: bool) -> int:
    model = mlp(nn.Tanh, depth, width=24)
    x = torch.randn(4, 16)
    model(x).sum().backward()
    c = GradientCollector(discover_layers(model))
    c.compute_on_device(slow)  # plans are built once per layout
    with _Ops() as ops:
        c.compute_on_device(slow)
    return ops.ops


@pytest.mark.parametrize("slow", [False, True])
def test_statistics_are_batched_not_per_layer(slow: bool) -> None:
    # 8 vs 200 equally shaped hidden layers: the same number of torch ops (stacked by shape on CPU,
    # multi-tensor kernels on accelerators); only the Python read of .grad is per parameter
    assert _collector_ops(200, slow) == _collector_ops(8, slow)


def _window(watcher: gradwatch.GradWatcher, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
            y: torch.Tensor, steps: int) -> tuple[int, int, int]:
    """(aten ops, Python calls, peak traced bytes) spent inside ``watcher.step`` over ``steps`` steps."""
    ops = _Ops()
    calls = 0

    def profiler(frame, event, arg) -> None:  # noqa: ANN001
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    peak = 0

    def measured(loss: torch.Tensor) -> None:
        nonlocal peak
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        sys.setprofile(profiler)
        try:
            with ops:
                watcher.step(loss)
        finally:
            sys.setprofile(None)
        peak = max(peak, tracemalloc.get_traced_memory()[1] - base)

    for _ in range(steps):
        train_step(model, opt, x, y, measured)
    return ops.ops, calls, peak


def test_step_cost_does_not_grow_with_history_length(tmp_path) -> None:
    # two windows in the same phase of every cadence (slow stats, samples, diagnosis), one while the
    # history fills and one long after its ring buffer wrapped: the same work
    model = mlp(nn.ReLU, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
    watcher = gradwatch.watch(model, log_dir=tmp_path, history_capacity=20, slow_stats_every_n=5,
                              activation_every_n_steps=10, histogram_every_n_steps=20, diagnose_every_n_steps=20,
                              figure_every_n_steps=0, on_error="raise")
    for _ in range(20):
        train_step(model, opt, x, y, watcher.step)
    tracemalloc.start()
    try:
        early = _window(watcher, model, opt, x, y, 20)    # steps 20..39
        for _ in range(160):
            train_step(model, opt, x, y, watcher.step)
        late = _window(watcher, model, opt, x, y, 20)     # steps 200..219
    finally:
        tracemalloc.stop()
    watcher.close()
    assert late[0] == early[0]                  # identical torch work
    assert late[1] <= early[1] * 1.1 + 200      # Python calls: the same, up to history's block merges
    assert late[2] <= early[2] * 1.5 + 65536    # no buffer that grows with the run


class _Syncs(TorchDispatchMode):
    """What would wait for an accelerator: scalar reads (``item()``, ``float(t)``, ``bool(t)``),
    copies to the host that are not ``non_blocking`` (``.cpu()``, ``.to("cpu")``), and the
    ``non_blocking`` copies the accelerator path launches instead (counted apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.async_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append("scalar read")
        elif func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
            self.syncs.append("copy to the host")
        elif func is torch.ops.aten.copy_.default and (kwargs.get("non_blocking") or (len(args) > 2 and args[2])):
            self.async_copies += 1
        return func(*args, **kwargs)


@contextmanager
def count_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Syncs]:
    mode = _Syncs()

    def counted(name: str) -> Callable:
        original = getattr(torch.Tensor, name)

        def method(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            mode.syncs.append(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        return method

    # (on CPU these return without dispatching an op; on an accelerator each waits for the device)
    with monkeypatch.context() as m:
        for name in ("cpu", "tolist", "item", "__bool__"):
            m.setattr(torch.Tensor, name, counted(name))
        with mode:
            yield mode


@pytest.mark.parametrize("slow_stats_every_n", [1, 3])
def test_the_accelerator_path_never_waits_for_the_device(monkeypatch: pytest.MonkeyPatch,
                                                         slow_stats_every_n: int) -> None:
    # the accelerator hot path forced on CPU tensors: every kind of step (slow statistics, the update
    # ratio after one, activation samples, diagnoses) launches one non_blocking copy and reads
    # nothing back from the device: the values of earlier steps are consumed from host memory
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = image_batch()
    watcher = gradwatch.watch(model, slow_stats_every_n=slow_stats_every_n, activation_every_n_steps=2,
                              diagnose_every_n_steps=4, hot_path="accelerator", on_error="raise")
    train_step(model, opt, x, y, watcher.step)  # first step: forward order, plans (host -> device only)
    for step in range(1, 10):
        with count_syncs(monkeypatch) as c:
            train_step(model, opt, x, y, watcher.step)  # the loss tensor rides along in the same copy
        assert c.syncs == [] and c.async_copies == 1, (step, c.syncs, c.async_copies)
    assert watcher.collected == 10 and watcher.error is None
    df = watcher.to_dataframe()  # waits for the last copies: every step is there
    assert sorted(df.step.unique()) == list(range(10))
    assert {"grad_norm", "grad_max_abs", "grad_mean_abs", "update_ratio", "act_rms", "out_grad_rms"} <= set(df.metric)
    watcher.close()


def test_the_host_path_is_told_apart_by_the_sync_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    # the counter above sees the host path's blocking copy: it would see one added to the accelerator path
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = image_batch()
    watcher = gradwatch.watch(model, hot_path="host", on_error="raise")
    train_step(model, opt, x, y, watcher.step)
    with count_syncs(monkeypatch) as c:
        train_step(model, opt, x, y, watcher.step)
    assert c.syncs == ["Tensor.cpu"] and c.async_copies == 0
    watcher.close()


def _train_pair(hot_path: str, steps: int, **kwargs: object) -> gradwatch.GradWatcher:
    torch.manual_seed(0)
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = image_batch()
    watcher = gradwatch.watch(model, hot_path=hot_path, slow_stats_every_n=3, activation_every_n_steps=4,
                              on_error="raise", **kwargs)
    for _ in range(steps):
        train_step(model, opt, x, y, watcher.step)
    return watcher


def test_the_accelerator_path_records_the_host_paths_statistics() -> None:
    host, accel = _train_pair("host", 12), _train_pair("accelerator", 12)
    a, b = host.to_dataframe(), accel.to_dataframe()
    host.close()
    accel.close()
    assert len(a) == len(b) and len(a)
    merged = a.merge(b, on=["step", "layer", "metric"], suffixes=("_host", "_accel"))
    assert len(merged) == len(a)
    assert merged.value_host.isna().equals(merged.value_accel.isna())
    assert torch.allclose(torch.tensor(merged.value_host.fillna(0).to_numpy()),
                          torch.tensor(merged.value_accel.fillna(0).to_numpy()), rtol=1e-4, atol=1e-12)


def test_delayed_values_are_never_lost() -> None:
    # at close, and when training raises: every launched step reaches the history and the sinks
    seen: list[int] = []

    class Steps(gradwatch.sinks.Sink):
        def write_step(self, record: gradwatch.sinks.StepRecord) -> None:
            seen.append(record.step)

    watcher = _train_pair("accelerator", 15, sinks=[Steps()])
    assert watcher.collected == 15
    watcher.close()
    assert seen == list(range(15)) and watcher.history.total_steps == 15
    torch.manual_seed(0)
    model = mlp(nn.ReLU, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    with pytest.raises(RuntimeError, match="boom"), gradwatch.watch(model, hot_path="accelerator") as w:
        for step in range(10):
            train_step(model, opt, x, y, w.step)
            if step == 6:
                raise RuntimeError("boom")
    assert w.history.total_steps == 7


@pytest.fixture
def one_rank_gloo(tmp_path) -> Iterator[None]:
    """A real gloo process group of one rank (a file store: no port), destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _ShardReducer:
    """Reduces like the Lightning integration's FSDP reducer; ``peer_fails_at`` plays another rank whose
    watcher failed at that reduction (it sends the failure flag from then on)."""

    def __init__(self, peer_fails_at: int | None = None) -> None:
        self.peer_fails_at = peer_fails_at
        self.calls: list[str] = []
        self._last: torch.Tensor | None = None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        from gradwatch.collect import reduce_sharded_rows

        self._last = rows
        flagged = self.peer_fails_at is not None and len(self.calls) >= self.peer_fails_at
        self.calls.append("reduce")
        return reduce_sharded_rows(rows, failed=flagged) if flagged else reduce_sharded_rows(rows)

    def abstain(self) -> None:
        from gradwatch.collect import reduce_sharded_rows

        self.calls.append("abstain")
        reduce_sharded_rows(torch.zeros_like(self._last), failed=True)


def test_the_sharded_reduction_never_waits_for_the_device(monkeypatch: pytest.MonkeyPatch, one_rank_gloo: None) -> None:
    model = SmallResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = image_batch()
    watcher = gradwatch.watch(model, slow_stats_every_n=3, hot_path="accelerator", on_error="raise")
    watcher.row_reducer = _ShardReducer()
    train_step(model, opt, x, y, watcher.step)
    for step in range(1, 6):
        with count_syncs(monkeypatch) as c:
            train_step(model, opt, x, y, watcher.step)
        assert c.syncs == [] and c.async_copies == 1, (step, c.syncs)
    assert sorted(watcher.to_dataframe().step.unique()) == list(range(6)) and watcher.error is None
    watcher.close()


@pytest.mark.parametrize("hot_path", ["host", "accelerator"])
def test_a_peers_failure_arrives_with_the_rows_and_the_watcher_keeps_joining(one_rank_gloo: None,
                                                                              hot_path: str) -> None:
    # another rank's watcher fails at the 4th reduction: this rank learns it from that step's rows (at once on
    # the host path; on the accelerator path when it reads them, here at the next step, before reducing),
    # records nothing from that step on, and takes part in every later reduction (zero rows) so that no
    # rank ever waits for another in the collective
    torch.manual_seed(0)
    model = mlp(nn.ReLU, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    watcher = gradwatch.watch(model, every_n_steps=2, hot_path=hot_path)
    reducer = watcher.row_reducer = _ShardReducer(peer_fails_at=3)
    for _ in range(14):
        train_step(model, opt, x, y, watcher.step)
    assert watcher.error is not None and "another rank" in watcher.error
    assert sorted(watcher.history.view().steps.tolist()) == [0, 2, 4]
    assert len(reducer.calls) == 7  # one per collected step: 0, 2, ..., 12
    assert reducer.calls == ["reduce"] * 4 + ["abstain"] * 3
    watcher.close()


def test_the_loss_scale_rides_along_without_a_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # watch(scaler=) records the GradScaler's scale on slow-stat steps from its device tensor, in the
    # step's one copy (get_scale() would be a host read); the values are the ones get_scale() gives
    torch.manual_seed(0)
    model = mlp(nn.Tanh, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    watcher = gradwatch.watch(model, scaler=scaler, slow_stats_every_n=2, hot_path="accelerator", on_error="raise")
    scales = []
    for step in range(8):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        scales.append(scaler.get_scale())
        if step == 0:  # first step: forward order, plans (host -> device only)
            watcher.step()
        else:
            with count_syncs(monkeypatch) as c:
                watcher.step()
            assert c.syncs == [] and c.async_copies == 1, (step, c.syncs)
        scaler.step(opt)
        scaler.update()
    assert list(watcher.history.loss_scales) == [(s, scales[s]) for s in range(0, 8, 2)]
    assert len(set(scales)) > 1  # the scale grew during the run: each step's own value was recorded
    watcher.close()
