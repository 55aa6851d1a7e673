"""Cost of gradwatch's TensorBoard output on a deep MLP (16 x Linear(512, 512), batch 128).

Interleaved rounds, one training step per condition per round (the order rotates), medians:

- ``plain``: forward, backward, SGD step;
- ``watch``: + ``watcher.step()`` with no sink (the core's cost, for reference);
- ``tb``: + a ``TensorBoardSink`` on a step without histograms (what ``write_step`` adds);
- ``tb+hist``: + a histogram step (every step is one here).

Also times ``TensorBoardSink.write_step`` and ``write_histograms`` on their own.

    python benchmarks/tensorboard_overhead.py [--rounds 40] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.sinks import StepRecord
from gradwatch.tensorboard import TensorBoardSink


def deep_mlp(width: int = 512, depth: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tmp = tempfile.mkdtemp(prefix="gw-bench-")
    x = torch.randn(128, 512, device=device)
    y = torch.randint(0, 512, (128,), device=device)
    common = dict(activations=False, diagnose_every_n_steps=0, figure_every_n_steps=0)
    setups = {}
    for name in ("plain", "watch", "tb", "tb+hist"):
        torch.manual_seed(0)
        model = deep_mlp().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        watcher = None
        if name == "watch":
            watcher = gradwatch.watch(model, histogram_every_n_steps=0, **common)
        elif name == "tb":
            watcher = gradwatch.watch(model, log_dir=f"{tmp}/tb", histogram_every_n_steps=10**9, **common)
        elif name == "tb+hist":
            watcher = gradwatch.watch(model, log_dir=f"{tmp}/hist", histogram_every_n_steps=1, **common)
        setups[name] = (model, opt, watcher)

    def step(name: str) -> float:
        model, opt, watcher = setups[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if watcher is not None:
            watcher.step()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    names = list(setups)
    for _ in range(3):  # warm-up (first step records forward order, allocates buffers)
        for n in names:
            step(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(step(n))
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    print(f"deep MLP 16 x Linear(512), batch 128, {args.threads} threads, {args.device}, {args.rounds} interleaved rounds (median ms):")
    for n in names:
        print(f"  {n:8s} {med[n]:8.2f} ms")
    print(f"  write_step overhead (tb - watch):       {med['tb'] - med['watch']:+.2f} ms")
    print(f"  histogram step over plain step:         {med['tb+hist'] - med['plain']:+.2f} ms ({med['tb+hist'] / med['plain']:.2f}x)")
    print(f"  histograms alone (tb+hist - tb):        {med['tb+hist'] - med['tb']:+.2f} ms")

    # the sink's methods on their own
    model, opt, watcher = setups["tb"]
    sink = next(s for s in watcher.sinks if isinstance(s, TensorBoardSink))
    layers = [layer.name for layer in watcher.layers]
    values = watcher.history.view(last=1).grad[-1].astype("float64")
    # wall time of the call, and CPU time of the whole process (the writer thread's serialisation and
    # checksums included: flush() waits for them), which a loaded machine inflates much less
    ws, wc = [], []
    for i in range(300):
        rec = StepRecord(step=10_000 + i, layers=layers, values=values.copy(), total_norm=1.0, loss=2.0)
        c0, t0 = time.process_time(), time.perf_counter()
        sink.write_step(rec)
        ws.append(time.perf_counter() - t0)
        sink.flush()
        wc.append(time.process_time() - c0)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    hs, hc = [], []
    for i in range(10):
        c0, t0 = time.process_time(), time.perf_counter()
        sink.write_histograms(20_000 + i, watcher.layers)
        if device.type == "cuda":
            torch.cuda.synchronize()
        hs.append(time.perf_counter() - t0)
        sink.flush()
        hc.append(time.process_time() - c0)
    opt.zero_grad()
    print(f"  TensorBoardSink.write_step alone:       {statistics.median(ws) * 1e6:.0f} us wall, "
          f"{statistics.median(wc) * 1e6:.0f} us CPU incl. writer thread "
          f"({len(layers)} layers, {sum(1 for v in values.reshape(-1) if v == v)} scalars per event)")
    print(f"  TensorBoardSink.write_histograms alone: {statistics.median(hs) * 1e3:.2f} ms wall, "
          f"{statistics.median(hc) * 1e3:.2f} ms CPU incl. writer thread "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M gradient values)")
    import os

    print(f"  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    for _, _, w in setups.values():
        if w is not None:
            w.close()


if __name__ == "__main__":
    main()
