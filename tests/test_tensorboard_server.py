"""A real TensorBoard server on loopback serves gradwatch's scalars, histograms, layout, figure and text."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from gw_testing import mlp, train, vector_task
from torch import nn

import gradwatch

STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base: str, path: str, **params: str):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read().decode("utf-8"))


@pytest.fixture()
def server(tmp_path: Path):
    """Write one run, start `tensorboard --host 127.0.0.1` on a free port, stop it afterwards."""
    model = mlp(nn.ReLU, 4)
    numel = sum(p.numel() for p in model[0].parameters())
    with gradwatch.watch(model, log_dir=tmp_path / "relu", histogram_every_n_steps=5, figure_every_n_steps=0) as w:
        train(model, vector_task(), 12, watcher=w)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port),
         "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", numel, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.mark.slow
def test_tensorboard_serves_gradwatch_data(server) -> None:
    base, numel, proc = server
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    scalars: dict = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            scalars = get_json(base, "/data/plugin/scalars/tags").get("relu", {})
            if "grad_norm/total" in scalars and "gradwatch/gradient_flow" in get_json(base, "/data/plugin/images/tags").get("relu", {}):
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    else:
        pytest.fail(f"tensorboard did not serve gradwatch's data within {STARTUP_TIMEOUT_S} s")

    assert {"grad_norm/00.0", "grad_to_weight/03.6", "dead_frac/00.1", "nonfinite/01.2"} <= set(scalars)
    series = get_json(base, "/data/plugin/scalars/scalars", run="relu", tag="grad_norm/total")
    assert [step for _, step, _ in series] == list(range(12))

    hist_tags = get_json(base, "/data/plugin/histograms/tags")["relu"]
    assert {"grad_hist/00.0", "grad_log10abs/00.0"} <= set(hist_tags)
    hist = get_json(base, "/data/plugin/histograms/histograms", run="relu", tag="grad_hist/00.0")
    assert [step for _, step, _ in hist] == [0, 5, 10]
    for _, _, buckets in hist:
        assert sum(count for _, _, count in buckets) == pytest.approx(numel)

    layout = get_json(base, "/data/plugin/custom_scalars/layout")
    (category,) = layout["category"]
    assert category["title"] == "gradwatch"
    assert any("grad_norm" in tag for chart in category["chart"] for tag in chart["multiline"]["tag"])

    assert "gradwatch/diagnosis/text_summary" in get_json(base, "/data/plugin/text/tags").get("relu", [])
