"""On a CUDA GPU: gradwatch's collected steps never synchronise with the device, and their delayed
values are the right ones.

Runs a real model (the deep MLP of ``overhead.py``) in four set-ups -- float32, bf16 autocast, fp16
autocast with a ``GradScaler`` (``unscale_`` before ``watcher.step()``), and gradient accumulation
over 4 micro-batches -- with gradwatch at its defaults (TensorBoard on, a histogram round every 25
steps: its counts also reach the host without a wait). Forward, backward and ``watcher.step()`` run
under ``torch.cuda.set_sync_debug_mode("error")``, so any synchronising call inside gradwatch
(``.item()``, a blocking ``.cpu()``, ``bool()`` of a device tensor ...) raises. The optimizer and
the scaler run outside it (``GradScaler.step`` reads ``found_inf`` on the host itself). Afterwards the
recorded total gradient norms are compared with norms computed on the device at every step.

Usage::

    python benchmarks/gpu_check.py            # exits 0 when every check passes; 2 without a GPU
    python benchmarks/gpu_check.py --steps 300

Then ``python benchmarks/overhead.py --device cuda`` gives the timing table.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from overhead import deep_mlp  # noqa: E402

import gradwatch  # noqa: E402


def _sync_debug(device: torch.device, mode: str) -> None:
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode(mode)


def run(setup: str, steps: int, device: torch.device, tmp: str) -> dict[str, object]:
    torch.manual_seed(0)
    model = deep_mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if setup == "fp16+GradScaler" else None
    dtype = {"bf16 autocast": torch.bfloat16, "fp16+GradScaler": torch.float16}.get(setup)
    if device.type == "cpu" and dtype is not None:
        dtype = torch.bfloat16
    micro = 4 if setup == "accumulation x4" else 1
    log_dir = os.path.join(tmp, setup.replace(" ", "_"))
    watcher = gradwatch.watch(model, log_dir=log_dir, histogram_every_n_steps=25,
                              hot_path="accelerator", on_error="raise", scaler=scaler)  # its scale rides along
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(128, 512, device=device, generator=g)
    y = torch.randn(128, 512, device=device, generator=g)
    reference: list[torch.Tensor] = []
    warmup = 12  # plans, the first slow step, the first activation sample (host -> device set-up copies)
    checked = 0
    t0 = time.perf_counter()
    for step in range(steps):
        strict = step >= warmup
        if strict:
            _sync_debug(device, "error")
        try:
            for _ in range(micro):
                with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                    loss = F.mse_loss(model(x), y) / micro
                (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                _sync_debug(device, "default")  # unscale_ is the scaler's, not gradwatch's
                scaler.unscale_(opt)
                if strict:
                    _sync_debug(device, "error")
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            reference.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))))
            watcher.step(loss)
            checked += strict
        finally:
            _sync_debug(device, "default")
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    totals = watcher.history.view(last=steps).total_norm.tolist()  # waits for the last delayed copies
    ref = torch.stack(reference).cpu().tolist()
    watcher.close()
    mismatches = sum(1 for a, b in zip(totals, ref, strict=True)
                     if not (math.isnan(a) and math.isnan(b)) and not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-30))
    return {"setup": setup, "steps": steps, "sync_checked_steps": checked, "recorded": len(totals),
            "total_norm_mismatches": mismatches, "histograms_per_layer": _histograms_per_layer(log_dir),
            "wall_s": round(wall, 2)}


def _histograms_per_layer(log_dir: str) -> int:
    """The fewest ``grad_hist`` events any layer got in ``log_dir`` (read back with TensorBoard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={HISTOGRAMS: 0})
    acc.Reload()
    tags = [t for t in acc.Tags()[HISTOGRAMS] if "grad_hist/" in t]
    return min((len(acc.Histograms(t)) for t in tags), default=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run the same set-ups on CPU tensors through the accelerator path (no sync check)")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing checked")
        return 2
    else:
        device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU dry run'}, torch {torch.__version__}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for setup in ("float32", "bf16 autocast", "fp16+GradScaler", "accumulation x4"):
            try:
                res = run(setup, args.steps, device, tmp)
            except RuntimeError as exc:  # set_sync_debug_mode("error") raises on a synchronising call
                ok = False
                print(f"[FAIL] {setup}: {exc}")
                continue
            good = (res["recorded"] == args.steps and res["total_norm_mismatches"] == 0
                    and res["histograms_per_layer"] >= (args.steps - 1) // 25)
            ok &= good
            print(("[ok]   " if good else "[FAIL] ") + "  ".join(f"{k}={v}" for k, v in res.items()))
    print("no synchronising call inside gradwatch's collected steps" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
