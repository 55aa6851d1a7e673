"""Bounded memory over a long run, and models with thousands of layers.

Memory: collected steps of a 500-layer model (plus 500 activations sampled every 50 steps) are fed
straight into ``History.append_step`` / ``append_sample``; the history's buffers must be exactly the
bound documented in :mod:`gradwatch.history` (about 35 MB for this model with the default
capacities), and once the rings have wrapped and the long-term summary has merged, no step may leave
a single new live allocation behind. That is measured with ``tracemalloc`` restricted to
gradwatch's own files (every Python object and numpy buffer allocated by gradwatch code is counted,
to the byte), not with the process's resident memory: RSS also moves with the allocator's own
bookkeeping, and a fixed RSS margin was crossed by allocator noise on a busy machine.

Scale: a 5,000-layer model is watched end to end (TensorBoard logs, histograms, diagnosis, figure),
and the work of one collected step -- torch ops and Python calls, counted, not timed -- grows at most
linearly from 500 to 5,000 layers (10x the parameters).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch
from gradwatch.activations import ACT_METRICS, LAYER_SIGNAL_METRICS
from gradwatch.collect import GRAD_METRICS
from gradwatch.history import ActivationMeta, History, LayerMeta

LAYERS = 500
#: untraced warm-up: the gradient ring (1000 steps) has wrapped 3 times and the long-term summary has
#: merged at steps 256, 512, 1024 and 2048, so every buffer is in its steady state
WARM = 3_000
#: traced steps: 2.5 more ring wraps, 50 activation samples and the summary merge at step 4096
STEPS = 6_000
HERE = Path(__file__).resolve().parent
GRADWATCH_FILES = os.path.join(os.path.dirname(gradwatch.__file__), "*")


def documented_bound(layers: int, activations: int, capacity: int = 1000, sample_capacity: int = 200,
                     slots: int = 256) -> int:
    """The bound stated in gradwatch.history's docstring, term by term (float32 rings, int64 steps,
    float64 summary sums and counts)."""
    g = len(GRAD_METRICS)
    return (capacity * (layers * g * 4 + 8)                                   # gradient ring
            + capacity * (2 * 4 + 8)                                          # total norm, loss
            + sample_capacity * (activations * len(ACT_METRICS) * 4 + 8)      # activation samples
            + sample_capacity * (layers * len(LAYER_SIGNAL_METRICS) * 4 + 8)  # layer signals
            + slots * (layers * g * 8 * 2 + 16))                              # long-term summary


def gradwatch_live() -> tuple[int, int]:
    """(bytes, blocks) allocated by gradwatch's own code since tracing started and still alive."""
    stats = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, GRADWATCH_FILES)]).statistics("filename")
    return sum(s.size for s in stats), sum(s.count for s in stats)


def simulate(steps: int = STEPS, warm: int = WARM) -> dict[str, int]:
    """Feed ``steps`` collected steps of a 500-layer model (with 500 activations sampled every 50 steps)
    into a ``History``; check what it keeps; return its bytes and what gradwatch's code allocated
    (``tracemalloc``): at registration, and still alive after the steps from ``warm`` on."""
    rng = np.random.default_rng(0)
    # 64 distinct step records, cycled (inputs are precomputed: the loop measures the history only);
    # NaN = slow metrics not measured, with a few non-finite counts and infinities mixed in
    block = 10.0 ** rng.uniform(-8, 2, (64, LAYERS, len(GRAD_METRICS)))
    block[1::2, :, [1, 3, 5, 7]] = np.nan
    block[:, :, GRAD_METRICS.index("nonfinite")] = 0.0
    block[7, 3, GRAD_METRICS.index("nonfinite")] = 2.0
    block[9, :, 0] = np.inf
    acts = rng.random((8, LAYERS, len(ACT_METRICS))).astype(np.float32)
    signal = rng.random((8, LAYERS, len(LAYER_SIGNAL_METRICS))).astype(np.float32)
    total = rng.random(64)

    tracemalloc.start()
    h = History()
    cols = h.register_layers([f"layer{i}" for i in range(LAYERS)], [LayerMeta("Linear", i, 64, 4096) for i in range(LAYERS)])
    acols = h.register_activations([f"act{i}" for i in range(LAYERS)], [ActivationMeta("relu", "ReLU", i) for i in range(LAYERS)])
    allocated = h.nbytes  # preallocated: what a watcher holds from its first step
    at_registration, _ = gradwatch_live()
    tracemalloc.stop()  # the warm-up runs untraced (fast); tracing restarts with nothing recorded

    def feed(start: int, stop: int) -> None:
        for s in range(start, stop):
            h.append_step(s, cols, block[s & 63], total[s & 63], 0.5)
            if s % 50 == 0:
                h.append_sample(s, acols, acts[s & 7], cols, signal[s & 7])

    feed(0, warm)
    tracemalloc.start()
    first_window = warm + (steps - warm) // 5
    feed(warm, first_window)
    early = gradwatch_live()  # what a step replaces (a Python int or two), now that every kind has run once
    feed(first_window, steps)
    late = gradwatch_live()
    tracemalloc.stop()
    # it still covers the whole run
    assert h.total_steps == steps and h.nonfinite_steps == steps // 64 + (1 if steps % 64 > 7 else 0)
    first, last, _ = h._summary.means()
    assert first[0] == 0 and last[-1] == steps - 1 and len(first) <= 256
    v = h.view(last=50)
    assert v.steps.tolist() == list(range(steps - 50, steps))
    assert gradwatch.diagnose(v) is not None
    df = h.to_dataframe(include_long_term=True)
    assert df.step.max() == steps - 1 and df.step.min() < max(10_000, steps // 50)
    return {"allocated": allocated, "nbytes": h.nbytes, "at_registration": at_registration,
            "early_bytes": early[0], "early_blocks": early[1], "late_bytes": late[0], "late_blocks": late[1],
            "summary_block": int(h._summary.block)}


@pytest.mark.slow
def test_long_run_on_500_layers_stays_within_the_documented_bound_and_allocates_nothing_per_step() -> None:
    # in a fresh process: no thread or object left by earlier tests can run gradwatch code while it traces
    code = "import json, test_scale; print(json.dumps(test_scale.simulate()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(HERE), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent),
                                                                          os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = documented_bound(LAYERS, LAYERS)
    print(f"\nhistory of {LAYERS} layers x {STEPS:,} steps: {r['nbytes']:,} bytes (documented bound {bound:,}); "
          f"gradwatch allocated {r['at_registration']:,} bytes at registration; live allocations left by steps "
          f"{WARM:,}-{STEPS:,}: {r['early_bytes']} B in {r['early_blocks']} blocks after the first "
          f"{(STEPS - WARM) // 5:,}, {r['late_bytes']} B in {r['late_blocks']} blocks at the end")
    assert r["allocated"] == r["nbytes"] == bound
    assert r["summary_block"] >= 32  # the traced steps crossed a summary merge (block 16 -> 32 at step 4096)
    # registration: the buffers, plus per-name bookkeeping (column maps, metadata): well under 1 %
    assert bound <= r["at_registration"] <= bound * 1.01
    # nothing per step: the same live blocks after 600 and after 3,000 traced steps (a step may replace
    # a Python int by another; a retained object per step, or per sample, would add 60 or 48 blocks)
    assert r["late_blocks"] == r["early_blocks"]
    assert abs(r["late_bytes"] - r["early_bytes"]) <= 8 * r["early_blocks"]


# -- thousands of layers -------------------------------------------------------------------------------
class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops += 1
        return func(*args, **(kwargs or {}))


def deep(layers: int, width: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i % 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def watched_steps(model: nn.Module, log_dir: Path, measure_step: int | None = None, steps: int = 3):
    """Train ``steps`` steps watched; step ``measure_step`` (collected, slow, activation-sampled) is counted:
    returns (watcher, torch ops, Python calls) of that ``watcher.step()``."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    watcher = gradwatch.watch(model, log_dir=log_dir, slow_stats_every_n=2, activation_every_n_steps=2,
                              histogram_every_n_steps=3, diagnose_every_n_steps=0, figure_every_n_steps=0,
                              on_error="raise")
    ops, calls = Ops(), 0

    def count(frame, event, arg) -> None:  # noqa: ANN001
        nonlocal calls
        calls += event in ("call", "c_call")

    for step in range(steps):  # step 0 records depth, builds plans and writes histograms; step 2 is like it
        F.mse_loss(model(x), y).backward()
        if step == measure_step:
            sys.setprofile(count)
            try:
                with ops:
                    watcher.step()
            finally:
                sys.setprofile(None)
        else:
            watcher.step()
        opt.step()
        opt.zero_grad()
    assert watcher.error is None
    return watcher, ops.ops, calls

@pytest.mark.slow
def test_5000_layers_work_and_step_cost_grows_at_most_linearly(tmp_path: Path) -> None:
    small, big = deep(500), deep(5000)
    factor = sum(p.numel() for p in big.parameters()) / sum(p.numel() for p in small.parameters())
    assert factor == pytest.approx(10.0)
    w_small, ops_small, calls_small = watched_steps(small, tmp_path / "small", measure_step=2)
    w_small.close()
    watcher, ops_big, calls_big = watched_steps(big, tmp_path / "big", measure_step=2)
    print(f"\none collected step, 500 -> 5000 layers: torch ops {ops_small} -> {ops_big}, "
          f"Python calls {calls_small} -> {calls_big}")
    assert ops_big <= ops_small * factor * 1.1
    assert calls_big <= calls_small * factor * 1.1

    # the 5000-layer run end to end: history, diagnosis, logs with histograms and the figure at close
    d = watcher.diagnose()
    watcher.close()
    linears = [name for name, m in big.named_modules() if isinstance(m, nn.Linear)]
    assert [r.name for r in d.layers] == linears and len(linears) == 5000
    assert watcher.history.view().grad.shape == (3, 5000, len(GRAD_METRICS))
    from gradwatch.logs import read_run

    run = read_run(tmp_path / "big")
    assert run.problems == [] and len(run.meta["layers"]) == 5000 and run.image_steps
    # every layer's value histogram (the log10|g| one only where some gradient is non-zero: at 5000
    # plain Linear layers the early layers' gradients underflow to exactly zero)
    assert sum(t.startswith("grad_hist/") for t in run.histogram_tags) == 5000
