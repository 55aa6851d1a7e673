"""What gradwatch costs per training step, next to a plain step and to the tools a user would otherwise pick.

One process; every variant trains its own copy of the same model; variants are interleaved step by
step (A B C ... A B C, the order rotated every round) so that machine drift and other processes'
load hit every variant alike. Reported per variant:

- the ratio of means (sum of step times / sum of plain step times over the same rounds: what a
  user pays, periodic steps -- slow statistics, histograms, samples, diagnoses -- included) beside
  the median over rounds of the paired ratio ``t_variant / t_plain`` with its interquartile range
  (a median hides the periodic steps); a plain-vs-plain "A/A" row shows the noise floor;
- the direct cost: median time spent inside the variant's own per-step call (``watcher.step()``,
  the peer's loop...) -- on CPU an op-level figure far below the machine's step-to-step noise;
- in a second phase, the cost of one histogram step, one slow-statistics step and one
  activation-sampling step (variants that do that work every step, paired against their base);
- peak memory added during a worst-case collected step (slow stats + histograms + activation
  sample), from the profiler's allocation events on CPU or ``max_memory_allocated`` on CUDA.

Examples::

    python benchmarks/overhead.py                     # all three models, ~10 min on 2 quiet cores
    python benchmarks/overhead.py --quick             # smoke run (~20 s)
    python benchmarks/overhead.py --device cuda --out gpu.json   # + the sync check (gpu_check.py)
    python benchmarks/overhead.py --scale             # cost vs number of layers / parameters
    python benchmarks/overhead.py --ops               # op-level timing of the statistics alone
    python benchmarks/overhead.py --hooks             # post-accumulate-grad hooks vs after backward

Synchronisation with the device happens only at measurement boundaries (before and after each
timed step), never inside a variant.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # gpu_check
import gradwatch  # noqa: E402

# -- models ----------------------------------------------------------------------------------------


def deep_mlp(width: int = 512, depth: int = 16) -> nn.Module:
    """``depth`` x ``Linear(width, width)`` with ReLU in between."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.short(x) + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """ResNet-style CNN: stem + 3 residual blocks (32, 64, 128 channels) = 9 convs with BatchNorm."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(_Block(32, 32, 1), _Block(32, 64, 2), _Block(64, 128, 2))
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class SmallTransformer(nn.Module):
    """Token embedding + 4-layer pre-LN transformer encoder (d_model 256, 4 heads) + classifier."""

    def __init__(self, vocab: int = 1000, d: int = 256, layers: int = 4, classes: int = 10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.emb(x))).mean(1))


class ParallelLayers(nn.Module):
    """``n`` small layers side by side, each on its own slice of the input: many layers whose
    gradients stay healthy (a chain of thousands of plain layers would vanish, and a vanishing layer
    is a different code path: its float32 sum of squares underflows and is recomputed in float64)."""

    def __init__(self, n: int, width: int = 32):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.act(layer(x[:, i])) for i, layer in enumerate(self.layers)], 1)


@dataclass
class Workload:
    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rounds: int           # at most this many interleaved rounds ...
    budget_s: float = 0   # ... or until this much time has passed (0: no limit), at least 8 rounds


def workloads(quick: bool) -> dict[str, Workload]:
    def mlp_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(128, 512, generator=g), torch.randn(128, 512, generator=g)

    def cnn_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)

    def tf_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, 1000, (16, 128), generator=g), torch.randint(0, 10, (16,), generator=g)

    if quick:
        rounds, budgets = (12, 8, 8), (0.0, 0.0, 0.0)
    else:  # ~10 minutes in all on 2 quiet cores, the component and memory phases included
        rounds, budgets = (1000, 600, 600), (240.0, 90.0, 90.0)
    return {
        "mlp": Workload("deep MLP (16 x Linear 512, batch 128)", deep_mlp, mlp_batch, F.mse_loss, rounds[0], budgets[0]),
        "cnn": Workload("ResNet-style CNN (9 conv + BN, 32x32, batch 64)", SmallResNet, cnn_batch, F.cross_entropy,
                        rounds[1], budgets[1]),
        "transformer": Workload("transformer encoder (4 x d256, seq 128, batch 16)", SmallTransformer, tf_batch,
                                F.cross_entropy, rounds[2], budgets[2]),
    }


# -- variants --------------------------------------------------------------------------------------


@dataclass
class Runner:
    """One variant's model, optimizer and per-step hook (called after backward, before the step)."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    after_backward: Callable[[torch.Tensor, int], None] | None = None
    close: Callable[[], None] = lambda: None
    steps: int = 0
    times: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Setup:
    """Factories for the variants; each returns a Runner around a fresh copy of the base model."""

    def __init__(self, base: nn.Module, device: torch.device, tmp: str):
        self.base = base
        self.device = device
        self.tmp = tmp

    def _fresh(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(self.base).to(self.device)
        return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def plain(self, name: str = "plain") -> Runner:
        model, opt = self._fresh()
        return Runner(name, model, opt)

    def gradwatch(self, name: str, tensorboard: bool = False, **kwargs: Any) -> Runner:
        model, opt = self._fresh()
        log_dir = tempfile.mkdtemp(dir=self.tmp, prefix=name.replace(" ", "_")) if tensorboard else None
        watcher = gradwatch.watch(model, log_dir=log_dir, on_error="raise", **kwargs)

        def hook(loss: torch.Tensor, step: int) -> None:
            watcher.step(loss)

        return Runner(name, model, opt, hook, watcher.close)

    def item_loop(self) -> Runner:
        """Per-parameter ``p.grad.norm().item()``: one device sync per tensor."""
        model, opt = self._fresh()
        named = list(model.named_parameters())
        sink: dict[str, float] = {}

        def hook(loss: torch.Tensor, step: int) -> None:
            for n, p in named:
                if p.grad is not None:
                    sink[n] = p.grad.norm().item()

        return Runner("peer: p.grad.norm().item() loop", model, opt, hook)

    def lightning_grad_norm(self) -> Runner | None:
        """Lightning's ``grad_norm(module, 2)`` as its docs use it in ``on_before_optimizer_step``,
        with the values taken to the host as ``log_dict`` does."""
        try:
            from lightning.pytorch.utilities import grad_norm
        except ImportError:
            return None
        model, opt = self._fresh()
        sink: dict[str, float] = {}

        def hook(loss: torch.Tensor, step: int) -> None:
            norms = grad_norm(model, norm_type=2)
            sink.update({k: float(v) for k, v in norms.items()})

        return Runner("peer: lightning grad_norm(module, 2)", model, opt, hook)

    def add_histogram(self, every: int = 100, name: str | None = None) -> Runner:
        """``SummaryWriter.add_histogram`` for every parameter's gradient every ``every`` steps."""
        from torch.utils.tensorboard import SummaryWriter

        model, opt = self._fresh()
        named = list(model.named_parameters())
        writer = SummaryWriter(tempfile.mkdtemp(dir=self.tmp, prefix="tbpeer"))

        def hook(loss: torch.Tensor, step: int) -> None:
            if step % every == 0:
                for n, p in named:
                    if p.grad is not None:
                        writer.add_histogram(f"grad/{n}", p.grad, step)

        return Runner(name or f"peer: add_histogram every {every}", model, opt, hook, writer.close)

    def tensor_hooks(self) -> Runner:
        """Per-tensor ``register_hook`` norms during backward (the ``wandb.watch`` mechanism)."""
        model, opt = self._fresh()
        sink: dict[str, float] = {}
        handles = []
        for n, p in model.named_parameters():
            def h(g: torch.Tensor, n: str = n) -> None:
                sink[n] = g.detach().norm().item()

            handles.append(p.register_hook(h))

        def close() -> None:
            for handle in handles:
                handle.remove()

        return Runner("peer: register_hook norms (wandb.watch-style)", model, opt, None, close)


def tensorboard_available() -> bool:
    try:
        import gradwatch.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def main_variants(s: Setup, full: bool) -> list[Runner]:
    rs = [s.plain("plain"), s.plain("plain (A/A control)")]
    if tensorboard_available():
        rs.append(s.gradwatch("gradwatch defaults (TensorBoard on)", tensorboard=True))
    rs.append(s.gradwatch("gradwatch stats only", activations=False))
    rs.append(s.gradwatch("gradwatch defaults, no TensorBoard"))
    if full:
        rs.append(s.gradwatch("gradwatch full (slow stats every step)", activations=False, slow_stats_every_n=1))
    rs += [s.item_loop()]
    lt = s.lightning_grad_norm()
    if lt is not None:
        rs.append(lt)
    rs += [s.add_histogram(100), s.tensor_hooks()]
    return rs


HIST_STEP = "gradwatch histogram step (every step)"
HIST_ROUND = "gradwatch histograms of all layers at once"


def histogram_round_steps(model: nn.Module) -> int:
    """Steps a histogram round takes at the watcher's default ``histogram_max_elements`` (the
    watcher's own packing: layers in order, at least one a step)."""
    import inspect

    from gradwatch.layers import discover_layers

    budget = inspect.signature(gradwatch.GradWatcher).parameters["histogram_max_elements"].default
    if budget is None:
        return 1
    steps, size = 1, 0
    for layer in discover_layers(model):
        if size and size + layer.numel > budget:
            steps, size = steps + 1, 0
        size += layer.numel
    return steps


def component_variants(s: Setup) -> list[tuple[Runner, str | None]]:
    """(runner, base) pairs: each runner does one kind of cadenced work every step; its cost is
    the paired difference to its base."""
    out: list[tuple[Runner, str | None]] = [(s.plain("plain"), None)]
    base = "gradwatch stats only"
    out.append((s.gradwatch(base, activations=False), None))
    out.append((s.gradwatch("slow-stat step (every step)", activations=False, slow_stats_every_n=1), base))
    out.append((s.gradwatch("slow-stat step, no update ratio (every step)", activations=False, slow_stats_every_n=1,
                            track_updates=False), base))
    out.append((s.gradwatch("activation-sample step (every step)", activation_every_n_steps=1), base))
    if tensorboard_available():
        tb = "gradwatch + TensorBoard, no histograms"
        out.append((s.gradwatch(tb, tensorboard=True, activations=False, histogram_every_n_steps=0), base))
        # a round of histograms is spread over `steps` steps of at most `histogram_max_elements`
        # gradient elements each: every step of this variant does its share of a round
        steps = histogram_round_steps(s.base)
        out.append((s.gradwatch(HIST_STEP, tensorboard=True, activations=False, histogram_every_n_steps=steps), tb))
        out.append((s.gradwatch(HIST_ROUND, tensorboard=True, activations=False, histogram_every_n_steps=1,
                                histogram_max_elements=None), tb))
    out.append((s.add_histogram(1, name="peer: add_histogram step (every step)"), "plain"))
    return out


# -- measurement -----------------------------------------------------------------------------------


def train_step(r: Runner, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, device: torch.device) -> None:
    r.opt.zero_grad(set_to_none=True)
    _sync(device)
    t0 = time.perf_counter()
    loss = loss_fn(r.model(x), y)
    loss.backward()
    if r.after_backward is not None:
        d0 = time.perf_counter()
        r.after_backward(loss, r.steps)
        r.direct.append(time.perf_counter() - d0)
    r.opt.step()
    _sync(device)
    r.times.append(time.perf_counter() - t0)
    r.steps += 1


def interleave(runners: list[Runner], wl: Workload, device: torch.device, rounds: int, warmup: int,
               seed: int = 0, deadline: float | None = None) -> int:
    """Run ``warmup + rounds`` rounds, one step of every runner per round, rotating the order."""
    g = torch.Generator().manual_seed(seed)
    batches = [tuple(t.to(device) for t in wl.batch(g)) for _ in range(4)]
    done = 0
    for k in range(warmup + rounds):
        x, y = batches[k % len(batches)]
        shift = k % len(runners)
        for r in runners[shift:] + runners[:shift]:
            train_step(r, x, y, wl.loss, device)
        if k == warmup - 1:
            for r in runners:
                r.times.clear()
                r.direct.clear()
        if k >= warmup:
            done += 1
            if deadline is not None and time.perf_counter() > deadline and done >= 8:
                break
    return done


def _q(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return math.nan
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarise(runners: list[Runner], plain: Runner) -> list[dict[str, Any]]:
    rows = []
    for r in runners:
        n = min(len(r.times), len(plain.times))
        ratios = [a / b for a, b in zip(r.times[:n], plain.times[:n], strict=True)]
        rows.append({
            "variant": r.name,
            "median_ms": statistics.median(r.times) * 1e3,
            "ratio_median": statistics.median(ratios),
            "ratio_q25": _q(ratios, 0.25),
            "ratio_q75": _q(ratios, 0.75),
            "ratio_amortised": sum(r.times[:n]) / sum(plain.times[:n]),
            "direct_ms": statistics.median(r.direct) * 1e3 if r.direct else None,
            "direct_mean_ms": statistics.fmean(r.direct) * 1e3 if r.direct else None,
            "rounds": n,
        })
    return rows


def component_costs(pairs: list[tuple[Runner, str | None]]) -> list[dict[str, Any]]:
    by_name = {r.name: r for r, _ in pairs}
    out = []
    for r, base in pairs:
        if base is None:
            continue
        b = by_name[base]
        n = min(len(r.times), len(b.times))
        diffs = [(a - c) * 1e3 for a, c in zip(r.times[:n], b.times[:n], strict=True)]
        row = {"component": r.name, "vs": base, "added_ms_median": statistics.median(diffs),
               "added_ms_q25": _q(diffs, 0.25), "added_ms_q75": _q(diffs, 0.75), "rounds": n}
        if r.direct and b.direct:
            row["direct_added_ms"] = (statistics.median(r.direct) - statistics.median(b.direct)) * 1e3
        elif r.direct:
            row["direct_added_ms"] = statistics.median(r.direct) * 1e3
        out.append(row)
    return out


def peak_memory(s: Setup, wl: Workload, device: torch.device) -> dict[str, float]:
    """Peak bytes allocated by torch during the first two steps of a fresh runner (step 0 of a watcher
    is its worst case: slow statistics, histograms and an activation sample at once), minus plain's."""
    factories: list[tuple[str, Callable[[], Runner]]] = [
        ("plain", lambda: s.plain()),
        ("gradwatch stats only", lambda: s.gradwatch("m", activations=False)),
        ("gradwatch defaults, no TensorBoard", lambda: s.gradwatch("m")),
    ]
    if tensorboard_available():
        factories.append(("gradwatch defaults (TensorBoard on)", lambda: s.gradwatch("m", tensorboard=True)))
    g = torch.Generator().manual_seed(1)
    x, y = (t.to(device) for t in wl.batch(g))
    peaks: dict[str, float] = {}
    for name, make in factories:
        r = make()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            for _ in range(2):
                train_step(r, x, y, wl.loss, device)
            peaks[name] = torch.cuda.max_memory_allocated(device) - base
        else:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                for _ in range(2):
                    train_step(r, x, y, wl.loss, device)
            events = []
            for e in prof.events():
                amount = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
                if amount:
                    events.append((e.time_range.start, amount))
            events.sort()
            cur = peak = 0
            for _, a in events:
                cur += a
                peak = max(peak, cur)
            peaks[name] = float(peak)
        r.close()
    plain = peaks.pop("plain")
    return {k: (v - plain) / 2**20 for k, v in peaks.items()} | {"plain_peak_MiB": plain / 2**20}


# -- op level --------------------------------------------------------------------------------------


def op_timing(device: torch.device, key: str = "mlp", reps: int = 40) -> list[dict[str, Any]]:
    """Time the statistics alone on a model's gradients, next to single reductions over the same
    memory (a read of all gradients is the floor for any per-layer statistic; deep MLP only) and
    next to the peers' own per-step work. Every timed call runs on fresh gradients, right after a
    backward pass (untimed), as in training: the caches hold what a real step leaves in them."""
    torch.manual_seed(0)
    wl = workloads(True)[key]
    model = wl.make().to(device)
    g = torch.Generator().manual_seed(0)
    x, y = (t.to(device) for t in wl.batch(g))
    params = list(model.parameters())
    named = list(model.named_parameters())
    from gradwatch.collect import GradientCollector
    from gradwatch.layers import discover_layers

    def backward() -> None:
        model.zero_grad(set_to_none=True)
        wl.loss(model(x), y).backward()

    backward()
    layers = discover_layers(model)
    fast = GradientCollector(layers, track_updates=False)
    slow = GradientCollector(layers, track_updates=True)
    slow.compute_on_device(True)  # leaves a snapshot: the next slow call measures update ratios too
    watcher = gradwatch.watch(model, activations=False, diagnose_every_n_steps=0, slow_stats_every_n=10**9,
                              on_error="raise")
    watcher.step()  # the first collected step is a slow one

    def host(parts: list[tuple[torch.device, torch.Tensor, list[int]]]) -> None:
        for _, rows, _ in parts:
            rows.cpu()

    def grads() -> list[torch.Tensor]:
        return [p.grad for p in params]

    try:
        from lightning.pytorch.utilities import grad_norm
    except ImportError:
        grad_norm = None
    cases: dict[str, Callable[[], object]] = {
        "floor: _foreach_max (one read of all grads)": lambda: torch._foreach_max(grads()),
    }
    singles: dict[str, Callable[[], object]] = {
        "_foreach_norm(2)": lambda: torch._foreach_norm(grads(), 2),
        "_foreach_norm(1)": lambda: torch._foreach_norm(grads(), 1),
        "_foreach_norm(inf)": lambda: torch._foreach_norm(grads(), math.inf),
        "vdot per tensor (sum of squares)": lambda: [torch.vdot(t.view(-1), t.view(-1)) for t in grads()],
        "aminmax per tensor": lambda: [torch.aminmax(t) for t in grads()],
        "abs().sum() per tensor": lambda: [t.abs().sum() for t in grads()],
        "(g == 0).sum() per tensor": lambda: [(t == 0).sum() for t in grads()],
        "count_nonzero per tensor": lambda: [torch.count_nonzero(t) for t in grads()],
        "isfinite().all() per tensor": lambda: [torch.isfinite(t).all() for t in grads()],
    }
    if key == "mlp":
        cases.update(singles)
    cases |= {
        "gradwatch per-step stats + host copy": lambda: host(fast.compute_on_device(False)),
        "gradwatch slow-step stats + host copy": lambda: host(slow.compute_on_device(True)),
        "gradwatch watcher.step() (stats + history)": lambda: watcher.step(),
        "peer: p.grad.norm().item() loop": lambda: [p.grad.norm().item() for _, p in named],
    }
    if grad_norm is not None:
        cases["peer: lightning grad_norm(module, 2) + to host"] = lambda: {
            k: float(v) for k, v in grad_norm(model, norm_type=2).items()}
    rows = []
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()
        _sync(device)
    for _ in range(reps):
        for k, fn in cases.items():
            backward()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    watcher.close()
    for k, v in times.items():
        rows.append({"op": k, "median_ms": statistics.median(v) * 1e3, "q25_ms": _q(v, 0.25) * 1e3,
                     "q75_ms": _q(v, 0.75) * 1e3})
    return rows


def hook_timing(device: torch.device, rounds: int = 40) -> list[dict[str, Any]]:
    """Per-parameter sums of squares in ``register_post_accumulate_grad_hook`` (the gradient still in
    cache; on accelerators overlapping the rest of backward) against one pass after backward, both
    over a plain backward of the deep MLP, interleaved, on separate copies of the model."""
    torch.manual_seed(0)
    base = deep_mlp().to(device)
    models = [copy.deepcopy(base) for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(128, 512, generator=g).to(device) for _ in range(2))
    after_params = list(models[1].parameters())
    hooked = list(models[2].parameters())
    out = torch.zeros(len(hooked), device=device)
    for i, p in enumerate(hooked):
        def h(t: torch.Tensor, i: int = i) -> None:
            v = t.grad.view(-1)
            out[i] = torch.vdot(v, v)

        p.register_post_accumulate_grad_hook(h)

    def backward(m: nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        F.mse_loss(m(x), y).backward()

    def after() -> None:
        backward(models[1])
        torch.stack([torch.vdot(p.grad.view(-1), p.grad.view(-1)) for p in after_params])

    cases = {"plain backward": lambda: backward(models[0]), "after-backward pass (sums of squares)": after,
             "post-accumulate-grad hooks (sums of squares)": lambda: backward(models[2])}
    times: dict[str, list[float]] = {k: [] for k in cases}
    items = list(cases.items())
    for k in range(rounds + 2):
        for name, fn in items[k % 3:] + items[:k % 3]:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if k >= 2:
                times[name].append(time.perf_counter() - t0)
    plain = times["plain backward"]
    return [{"case": k, "median_ms": statistics.median(v) * 1e3, "mean_ms": statistics.fmean(v) * 1e3,
             "added_mean_ms": (statistics.fmean(v) - statistics.fmean(plain)) * 1e3} for k, v in times.items()]


# -- scale -----------------------------------------------------------------------------------------


def scale_sweep(device: torch.device, quick: bool, layer_counts: list[int] | None = None,
                widths: list[int] | None = None, rounds: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per-step cost of gradwatch (statistics only, defaults) vs the number of layers and parameters."""
    out: dict[str, list[dict[str, Any]]] = {"layers": [], "params": []}
    if layer_counts is None:
        layer_counts = [10, 100, 1000] if quick else [10, 100, 1000, 5000]
    if widths is None:
        widths = [64, 256, 1024] if quick else [64, 128, 256, 512, 1024, 2048]

    def measure(model: nn.Module, x: torch.Tensor, label: dict[str, Any], rounds: int) -> dict[str, Any]:
        base = model
        with tempfile.TemporaryDirectory() as tmp:
            s = Setup(base, device, tmp)
            rs = [s.plain(), s.gradwatch("gradwatch stats only", activations=False),
                  s.gradwatch("gradwatch slow-stat step", activations=False, slow_stats_every_n=1)]
            wl = Workload("scale", lambda: base, lambda g: (x, torch.zeros(())), lambda out, y: out.square().mean(), rounds)
            t0 = time.perf_counter()
            interleave(rs, wl, device, rounds=rounds, warmup=2)
            rows = summarise(rs, rs[0])
            for r in rs:
                r.close()
        n_params = sum(p.numel() for p in base.parameters())
        # what the user pays: the whole step's time over the plain one's, paired by round (the call's
        # own time also includes work the optimizer then no longer does, e.g. the Python objects of
        # fresh gradients, which the first reader of ``p.grad`` creates)
        added = [(a - b) * 1e3 for a, b in zip(rs[1].times, rs[0].times, strict=False)]
        res = dict(label, params=n_params, tensors=len(list(base.parameters())), plain_ms=rows[0]["median_ms"],
                   step_direct_ms=rows[1]["direct_ms"], added_ms_median=statistics.median(added),
                   added_ms_mean=statistics.fmean(added), slow_step_direct_ms=rows[2]["direct_ms"],
                   ratio=rows[1]["ratio_median"], ratio_of_means=rows[1]["ratio_amortised"],
                   wall_s=time.perf_counter() - t0)
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in res.items()), flush=True)
        return res

    print("layer-count sweep (n parallel Linear(32, 32) + ReLU layers, batch 32):", flush=True)
    for n in layer_counts:
        torch.manual_seed(0)
        model = ParallelLayers(n)
        k = rounds or (6 if quick else max(8, min(60, 6000 // n)))
        out["layers"].append(measure(model, torch.randn(32, n, 32), {"layers": n}, k))
    print("parameter-count sweep (8 x Linear(w, w), batch 64):", flush=True)
    for w in widths:
        torch.manual_seed(0)
        model = deep_mlp(width=w, depth=8)
        k = rounds or (6 if quick else max(8, min(60, int(60 * (512 / w) ** 2))))
        out["params"].append(measure(model, torch.randn(64, w), {"width": w}, k))
    return out


# -- targets ---------------------------------------------------------------------------------------

#: issue #14's targets: ratio of means (total wall time of the interleaved steps, periodic steps
#: included) of gradwatch at defaults (TensorBoard on) per model
DEFAULT_TARGETS = {"mlp": 1.06, "cnn": 1.02, "transformer": 1.02}
FULL_TARGET = 1.15           # every statistic every step, deep MLP
AA_TOLERANCE = 0.02          # the A/A control's ratio of means must be within 1 +- this for a valid run
HISTOGRAM_TARGET_MS = 10.0   # a histogram step over a plain step, deep MLP
NORM_PEERS = ("peer: p.grad.norm().item() loop", "peer: lightning grad_norm(module, 2)",
              "peer: register_hook norms (wandb.watch-style)")


def check_targets(models: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per target: the measured value, the bound, met or not."""
    out: list[dict[str, Any]] = []
    for key, entry in models.items():
        rows = {r["variant"]: r for r in entry["rows"]}
        default = rows.get("gradwatch defaults (TensorBoard on)") or rows.get("gradwatch defaults, no TensorBoard")
        if key in DEFAULT_TARGETS and default is not None:
            out.append({"model": key, "target": f"{default['variant']} <= {DEFAULT_TARGETS[key]}x plain (means)",
                        "value": default["ratio_amortised"], "met": default["ratio_amortised"] <= DEFAULT_TARGETS[key]})
            for peer in NORM_PEERS[:2]:
                if key == "mlp" and peer in rows:
                    out.append({"model": key, "target": f"defaults (means) below {peer.removeprefix('peer: ')}",
                                "value": default["ratio_amortised"] - rows[peer]["ratio_amortised"],
                                "met": default["ratio_amortised"] < rows[peer]["ratio_amortised"]})
        control = rows.get("plain (A/A control)")
        if control is not None:
            out.append({"model": key, "target": f"A/A control within 1 +- {AA_TOLERANCE} (means; run valid)",
                        "value": control["ratio_amortised"], "met": abs(control["ratio_amortised"] - 1) <= AA_TOLERANCE})
        full = rows.get("gradwatch full (slow stats every step)")
        if key == "mlp" and full is not None:
            out.append({"model": key, "target": f"full <= {FULL_TARGET}x plain (means)", "value": full["ratio_amortised"],
                        "met": full["ratio_amortised"] <= FULL_TARGET})
        comps = {c["component"]: c for c in entry.get("components", [])}
        hist = comps.get(HIST_STEP)
        if key == "mlp" and hist is not None:
            out.append({"model": key, "target": f"histogram step <= +{HISTOGRAM_TARGET_MS} ms",
                        "value": hist["added_ms_median"], "met": hist["added_ms_median"] <= HISTOGRAM_TARGET_MS})
        ours = rows.get("gradwatch stats only")
        if ours is not None:
            for peer in NORM_PEERS:
                if peer in rows:
                    out.append({"model": key, "target": f"stats only cheaper than {peer.removeprefix('peer: ')}",
                                "value": ours["ratio_amortised"] - rows[peer]["ratio_amortised"],
                                "met": ours["ratio_amortised"] < rows[peer]["ratio_amortised"]})
    return out


# -- output ----------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"{'variant':<46} {'median ms':>10} {'ratio of':>9} {'':>15} {'ratio of':>9} {'direct ms':>10} {'direct ms':>10}")
    print(f"{'':<46} {'':>10} {'medians':>9} {'IQR':>15} {'means':>9} {'median':>10} {'mean':>10}")
    for r in rows:
        direct = f"{r['direct_ms']:.3f}" if r["direct_ms"] is not None else "-"
        direct_mean = f"{r['direct_mean_ms']:.3f}" if r["direct_mean_ms"] is not None else "-"
        print(f"{r['variant']:<46} {r['median_ms']:>10.2f} {r['ratio_median']:>9.3f} "
              f"{r['ratio_q25']:>7.3f}-{r['ratio_q75']:<7.3f} {r['ratio_amortised']:>9.3f} {direct:>10} {direct_mean:>10}")


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info = {"python": platform.python_version(), "torch": torch.__version__, "gradwatch": getattr(gradwatch, "__version__", "?"),
            "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform()}
    with contextlib.suppress(OSError):
        info["loadavg"] = os.getloadavg()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--models", default="mlp,cnn,transformer", help="comma-separated subset of mlp,cnn,transformer")
    p.add_argument("--rounds", type=int, default=None, help="rounds per model (default: 1000 MLP, 600 CNN/transformer, within --budget-s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few rounds")
    p.add_argument("--no-full", action="store_true", help="skip the 'full' (every statistic every step) variant")
    p.add_argument("--no-components", action="store_true", help="skip the per-component cost phase")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory phase")
    p.add_argument("--scale", action="store_true", help="sweep layer and parameter counts instead")
    p.add_argument("--layers", default=None,
                   help="--scale: comma-separated layer counts (default 10,100,1000,5000); 'none' skips the sweep")
    p.add_argument("--widths", default=None,
                   help="--scale: comma-separated widths (default 64,...,2048); 'none' skips the sweep")
    p.add_argument("--ops", action="store_true", help="op-level timing of the statistics alone instead")
    p.add_argument("--hooks", action="store_true",
                   help="post-accumulate-grad hooks vs an after-backward pass (deep MLP) instead")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop each model's timing phase after this long (default: 240 s MLP, 90 s CNN/transformer)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    logging.getLogger("gradwatch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    result: dict[str, Any] = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": machine(),
                              "tensorboard_sink": tensorboard_available()}
    started = time.perf_counter()
    if args.ops:
        result["ops"] = {}
        for key in (args.models.split(",") if args.models else ["mlp", "cnn", "transformer"]):
            rows = op_timing(device, key, reps=40 if key == "mlp" else 20)
            print(f"\nop-level timing on the {key}'s fresh gradients, right after backward ({device}):", flush=True)
            for r in rows:
                print(f"  {r['op']:<48} median {r['median_ms']:8.3f} ms   IQR {r['q25_ms']:.3f}..{r['q75_ms']:.3f} ms")
            result["ops"][key] = rows
    elif args.hooks:
        result["hooks"] = hook_timing(device, rounds=args.rounds or 40)
        print(f"\nper-parameter sums of squares on the deep MLP ({device}, interleaved rounds):")
        for r in result["hooks"]:
            print(f"  {r['case']:<46} median {r['median_ms']:8.2f} ms  mean {r['mean_ms']:8.2f} ms  "
                  f"added (means) {r['added_mean_ms']:+.2f} ms")
    elif args.scale:
        def counts(arg: str | None) -> list[int] | None:
            return None if arg is None else ([] if arg == "none" else [int(v) for v in arg.split(",")])

        result["scale"] = scale_sweep(device, args.quick, counts(args.layers), counts(args.widths), args.rounds)
    else:
        if not tensorboard_available():
            print("note: gradwatch.tensorboard is not available; the TensorBoard variants are skipped", flush=True)
        wls = workloads(args.quick)
        result["models"] = {}
        for key in [m.strip() for m in args.models.split(",") if m.strip()]:
            if key not in wls:
                p.error(f"--models: unknown model {key!r}; allowed: {', '.join(wls)}")
            wl = wls[key]
            torch.manual_seed(0)
            base = wl.make()
            rounds = args.rounds or wl.rounds
            entry: dict[str, Any] = {"workload": wl.name, "params": sum(q.numel() for q in base.parameters())}
            with tempfile.TemporaryDirectory() as tmp:
                s = Setup(base, device, tmp)
                runners = main_variants(s, full=not args.no_full)
                t0 = time.perf_counter()
                budget = args.budget_s if args.budget_s is not None else (None if args.rounds else wl.budget_s)
                deadline = t0 + budget if budget else None
                done = interleave(runners, wl, device, rounds=rounds, warmup=3, deadline=deadline)
                rows = summarise(runners, runners[0])
                entry["rows"] = rows
                entry["rounds"] = done
                entry["timing_s"] = time.perf_counter() - t0
                entry["raw_ms"] = {r.name: [t * 1e3 for t in r.times] for r in runners}
                for r in runners:
                    r.close()
                print_table(f"{wl.name}: {done} interleaved rounds, {device}, {torch.get_num_threads()} threads", rows)
                if not args.no_components:
                    pairs = component_variants(s)
                    crounds = 6 if args.quick else max(12, min(40, done // 6))
                    interleave([r for r, _ in pairs], wl, device, rounds=crounds, warmup=2, seed=1)
                    comps = component_costs(pairs)
                    for r, _ in pairs:
                        r.close()
                    entry["components"] = comps
                    print(f"  cost of one step of each kind ({crounds} rounds, paired difference; direct = inside the call):")
                    for c in comps:
                        d = c.get("direct_added_ms")
                        print(f"    {c['component']:<44} +{c['added_ms_median']:7.2f} ms "
                              f"(IQR {c['added_ms_q25']:.2f}..{c['added_ms_q75']:.2f}) vs {c['vs']!r}"
                              + (f"; direct +{d:.2f} ms" if d is not None else ""))
                if not args.no_memory:
                    mem = peak_memory(s, wl, device)
                    entry["peak_memory_added_MiB"] = mem
                    print("  peak memory added over plain, worst-case collected step: "
                          + ", ".join(f"{k}: {v:+.2f} MiB" for k, v in mem.items()))
            result["models"][key] = entry
        result["targets"] = check_targets(result["models"])
        print("\ntargets (ratios of means: total time of the interleaved steps, periodic steps included; 'value' of "
              "a peer comparison = our ratio minus the peer's):")
        for t in result["targets"]:
            print(f"  [{'met' if t['met'] else 'MISSED'}] {t['model']:<11} {t['target']:<62} {t['value']:+.4f}")
        if device.type == "cuda":
            import gpu_check

            print("\nsync check (benchmarks/gpu_check.py):", flush=True)
            result["sync_check_rc"] = gpu_check.main([])
    result["total_s"] = time.perf_counter() - started
    with contextlib.suppress(OSError):
        result["machine"]["loadavg_end"] = os.getloadavg()  # other processes' load: > ~1.5 on 2 cores spoils timings
    load = result["machine"].get("loadavg"), result["machine"].get("loadavg_end")
    print(f"\ntotal {result['total_s']:.0f} s; torch {torch.__version__}; {result['machine']['cpu']}, "
          f"{torch.get_num_threads()} threads; load average at start/end {load[0]} / {load[1]}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
