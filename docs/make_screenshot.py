"""Take docs/dashboard.png: gradwatch's one-page dashboard in a real TensorBoard, headless Chromium.

Trains a deep sigmoid MLP (vanishing gradients) with ``gradwatch.watch(log_dir=...)``, starts
``tensorboard`` on a free loopback port, waits until it serves gradwatch's data, and screenshots
the CUSTOM SCALARS page with Chromium; with ``--all`` also the log10|g| histograms
(``dashboard_histograms.png``) and the figure ``gradwatch report`` writes (``gradient_flow.png``).

With ``--tab`` (also part of ``--all``) it screenshots the gradwatch tab (``gradwatch/dashboard``),
driven with Selenium so that a heatmap cell is clicked and the drill-down charts show:
``tab_sigmoid_before_after.png`` (the demo's deep sigmoid MLP before and after gradwatch's fix, side
by side on one colour scale) and ``tab_transformer.png`` (a 112-layer pre-LN transformer).

    apt-get install -y chromium chromium-driver     # once
    python docs/make_screenshot.py [--out docs] [--all | --tab] [--keep LOGDIR]
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


def train_transformer(run_dir: Path, blocks: int = 18, steps: int = 150) -> None:
    """A deep pre-LayerNorm transformer (6 layers per block + embeddings, norm, head: 112 layers at 18 blocks)."""
    from gradwatch import tasks
    from gradwatch.models import TinyTransformer

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = tasks.majority_token_sequences(g, n=1024, length=16, vocab=4)
    model = TinyTransformer(4, 16, d_model=32, heads=4, layers=blocks, classes=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with gradwatch.watch(model, log_dir=run_dir, histogram_every_n_steps=0, figure_every_n_steps=0,
                         diagnose_every_n_steps=25) as watcher:
        for step in range(steps):
            i = (step * 64) % len(x)
            loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            loss.backward()
            watcher.step(loss)
            opt.step()
            opt.zero_grad()


def tab_screenshot(logdir: Path, out: Path, click: tuple[float, float] | None, size: tuple[int, int] = (1600, 1300),
                   metric: str | None = None) -> None:
    """Serve ``logdir``, open the gradwatch tab in headless Chromium (Selenium), optionally pick ``metric``,
    click the heatmap cell at ``click`` (fractions of the first panel's rows and columns), screenshot."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise SystemExit("Chromium and chromedriver are needed: apt-get install -y chromium chromium-driver")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                           "--port", str(port), "--samples_per_plugin", "scalars=1000000"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    browser = None
    try:
        runs = sorted(str(p.parent.relative_to(logdir)) for p in logdir.rglob("events.out.tfevents*"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(base + "/data/plugin/gradwatch/runs", timeout=5) as r:  # noqa: S310 - loopback
                    if {x["run"] for x in json.loads(r.read())["runs"]} >= set(runs):
                        break
            except OSError:
                pass
            time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        with tempfile.TemporaryDirectory() as profile:
            for flag in (*CHROMIUM_FLAGS, "--disable-quic", f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}"):
                options.add_argument(flag)
            browser = webdriver.Chrome(service=Service(executable_path=driver), options=options)
            browser.get(f"{base}/?darkMode=false#gradwatch")
            wait = WebDriverWait(browser, 120, poll_frequency=0.2)
            browser.switch_to.frame(wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "iframe")[0]))
            drawn = "return document.body && document.body.dataset.state"
            wait.until(lambda b: b.execute_script(drawn) == "drawn")
            if metric:
                Select(browser.find_element(By.ID, "gw-metric")).select_by_value(metric)
                wait.until(lambda b: b.execute_script(drawn + " + document.body.dataset.metric") == "drawn" + metric)
            if click:
                panel = browser.find_element(By.CSS_SELECTOR, ".gw-panel")
                canvas = panel.find_element(By.CSS_SELECTOR, "canvas.gw-heatmap")
                rows, cell_h = int(panel.get_attribute("data-rows")), float(panel.get_attribute("data-cell-h"))
                label_w = int(panel.get_attribute("data-label-w"))
                x = label_w + click[1] * (canvas.size["width"] - label_w) - canvas.size["width"] / 2
                y = (int(click[0] * (rows - 1)) + 0.5) * cell_h - canvas.size["height"] / 2
                ActionChains(browser).move_to_element_with_offset(canvas, int(x), int(y)).click().perform()
                for chart in ("gw-layer-chart", "gw-profile-chart"):
                    wait.until(lambda b, c=chart: b.find_element(By.ID, c).get_attribute("data-state") == "drawn")
            browser.switch_to.default_content()
            out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(out))
            print(f"wrote {out}")
    finally:
        if browser is not None:
            browser.quit()
        tb.terminate()
        try:
            tb.wait(timeout=15)
        except subprocess.TimeoutExpired:
            tb.kill()


def tab_screenshots(logdir: Path, out: Path) -> None:
    """The gradwatch tab: the demo's sigmoid MLP before/after its fix, and a 112-layer transformer."""
    from gradwatch import demo

    demo.run_case("sigmoid_mlp", logdir=logdir / "tab_sigmoid")
    tab_screenshot(logdir / "tab_sigmoid", out / "tab_sigmoid_before_after.png", click=(0.0, 0.6))
    train_transformer(logdir / "tab_transformer" / "transformer_112_layers")
    tab_screenshot(logdir / "tab_transformer", out / "tab_transformer.png", click=(0.1, 0.5), size=(1600, 1500))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="directory for the PNG(s)")
    ap.add_argument("--all", action="store_true", help="also the log10|g| histograms page and the report's figure")
    ap.add_argument("--tab", action="store_true", help="only the gradwatch tab's screenshots (needs chromedriver, selenium)")
    ap.add_argument("--keep", metavar="LOGDIR", help="write the run here and keep it (default: a temporary directory)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gradwatch-shot-"))
    if args.tab or args.all:
        try:
            tab_screenshots(root, Path(args.out))
        finally:
            if args.tab and not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        if args.tab:
            return 0
    logdir = root / "custom_scalars"
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
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
