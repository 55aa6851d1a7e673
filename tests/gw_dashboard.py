"""A real ``tensorboard`` process on a free loopback port, for the dashboard tests (``from gw_dashboard import ...``)."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

STARTUP_TIMEOUT_S = 180
PLUGIN = "/data/plugin/gradwatch/"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    """``tensorboard --logdir <logdir> --host 127.0.0.1 --port <free>``; stopped by :meth:`stop`."""

    def __init__(self, logdir: Path, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
             "--port", str(self.port), "--reload_interval", "1", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def get(self, path: str, **params: Any) -> tuple[int, Any, str]:
        """``(status, parsed JSON or None, content type)`` of a GET; 4xx/5xx answers are returned, not raised."""
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - loopback only
                status, body, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            status, body, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
        try:
            parsed = json.loads(body.decode("utf-8"))
        except ValueError:
            parsed = body.decode("utf-8", "replace")
        return status, parsed, ctype

    def plugin(self, route: str, **params: Any) -> Any:
        status, body, _ = self.get(PLUGIN + route, **params)
        assert status == 200, (route, params, status, body)
        return body

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Poll ``condition`` (bounded): fails with the server's output if it exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tensorboard exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if condition():
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, AssertionError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"tensorboard did not {what} within {timeout} s")

    def wait_for_runs(self, runs: dict[str, int]) -> None:
        """Wait until the plugin lists every ``run`` with at least ``n`` collected steps (TensorBoard loads in the background)."""

        def ready() -> bool:
            listed = {r["run"] for r in self.plugin("runs")["runs"]}
            if not set(runs) <= listed:
                return False
            return all(self.plugin("heatmap", run=r, metric="grad_norm", width=1, height=1)["n_steps"] >= n
                       for r, n in runs.items())

        self.wait_until(ready, f"serve the runs {sorted(runs)}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


def cells(payload: dict) -> np.ndarray:
    """The heatmap route's values as a ``rows x cols`` float32 array."""
    raw = np.frombuffer(base64.b64decode(payload["values"]), dtype="<f4")
    return raw.reshape(payload["shape"])
