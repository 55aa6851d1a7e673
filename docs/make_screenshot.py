"""Take docs/dashboard.png: gradwatch's one-page dashboard in a real TensorBoard, headless Chromium.

Trains a deep sigmoid MLP (vanishing gradients) with ``gradwatch.watch(log_dir=...)``, starts
``tensorboard`` on a free loopback port, waits until it serves gradwatch's data, and screenshots
the CUSTOM SCALARS page with Chromium; with ``--all`` also the log10|g| histograms
(``dashboard_histograms.png``) and the figure ``gradwatch report`` writes (``gradient_flow.png``).

    apt-get install -y chromium          # once
    python docs/make_screenshot.py [--out docs] [--all] [--keep LOGDIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
]


def train(logdir: Path) -> None:
    """A 12-layer sigmoid MLP: the early layers' gradients are orders of magnitude below the late ones'."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, 32), nn.Sigmoid()]
    for _ in range(10):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    with gradwatch.watch(model, log_dir=logdir / "deep_sigmoid", histogram_every_n_steps=20, figure_every_n_steps=100,
                         activation_every_n_steps=10, diagnose_every_n_steps=20) as watcher:
        for step in range(300):
            i = (step * 32) % 512
            loss = F.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            loss.backward()
            watcher.step(loss)
            opt.step()
            opt.zero_grad()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_data(base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/data/plugin/scalars/tags", timeout=5) as r:  # noqa: S310 - loopback
                if "grad_norm/total" in json.loads(r.read()).get("deep_sigmoid", {}):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"TensorBoard at {base} did not serve gradwatch's data within {timeout} s")


def screenshot(url: str, out: Path, size: tuple[int, int] = (1600, 1250), budget_ms: int = 25000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("Chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        proc = subprocess.run(cmd, timeout=180, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"Chromium did not write {out} (exit {proc.returncode}): {proc.stderr[-2000:]}")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="directory for the PNG(s)")
    ap.add_argument("--all", action="store_true", help="also the log10|g| histograms page and the report's figure")
    ap.add_argument("--keep", metavar="LOGDIR", help="write the run here and keep it (default: a temporary directory)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gradwatch-shot-"))
    train(logdir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                           "--port", str(port), "--load_fast", "false"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_data(base)
        out = Path(args.out)
        screenshot(f"{base}/?darkMode=false#custom_scalars", out / "dashboard.png")
        if args.all:
            screenshot(f"{base}/?darkMode=false#histograms&tagFilter=grad_log10abs", out / "dashboard_histograms.png")
            from gradwatch.cli import report

            with tempfile.TemporaryDirectory() as tmp:  # the figure `gradwatch report` writes for this run
                report(str(logdir), out=tmp)
                shutil.copy(Path(tmp) / "deep_sigmoid" / "gradient_flow.png", out / "gradient_flow.png")
    finally:
        tb.terminate()
        try:
            tb.wait(timeout=15)
        except subprocess.TimeoutExpired:
            tb.kill()
        if not args.keep:
            shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
