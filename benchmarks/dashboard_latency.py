"""How fast the gradwatch tab answers at scale, and what it costs TensorBoard's start-up.

1. Writes a synthetic run of ``--layers`` x ``--steps`` ``grad_to_weight`` scalars (tags as gradwatch
   writes them; default 500 x 10,000 = 5M values) straight to an event file.
2. Starts ``tensorboard --samples_per_plugin scalars=1000000`` (every step kept) on a free loopback port,
   waits until the run is fully loaded, and times the heatmap route: the first request (reads every
   point through the data provider and builds the dense matrix) and later ones (cached matrix,
   downsampled to a 1000 x 600 grid with min, median and max).
3. Times TensorBoard's start-up (process start to ``/data/plugins_listing`` answering) with this
   environment (plugin installed) and, with ``--without PYTHON``, another environment's Python that has
   no gradwatch plugin.

    python benchmarks/dashboard_latency.py [--layers 500] [--steps 10000] [--without /path/to/python]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gw_dashboard import PLUGIN, TensorBoard, free_port  # noqa: E402

from gradwatch import tags as T  # noqa: E402
from gradwatch.checksums import masked_crc32c  # noqa: E402
from gradwatch.tensorboard_events import encode_scalars, event_bytes, value_prefix  # noqa: E402

log = logging.getLogger("dashboard_latency")


def write_run(run_dir: Path, layers: int, steps: int) -> None:
    """One event file: per step, every layer's grad_to_weight (decaying with depth) and grad_norm/total."""
    run_dir.mkdir(parents=True, exist_ok=True)
    width = T.depth_width(layers)
    tags = [T.layer_tag("grad_to_weight", i, f"blocks.{i}.linear", width) for i in range(layers)] + [T.total_tag("grad_norm")]
    prefixes = np.array([value_prefix(t) for t in tags], dtype=object)
    rng = np.random.default_rng(0)
    depth_scale = np.logspace(-6, 0, layers)
    path = run_dir / "events.out.tfevents.0.bench"
    with open(path, "wb") as fh:
        for step in range(steps):
            values = np.append(depth_scale * rng.lognormal(0, 0.3, layers), 1.0).astype(np.float32)
            record = event_bytes(encode_scalars(prefixes, values), step, 1.0e9 + step)
            header = len(record).to_bytes(8, "little")
            fh.write(header + masked_crc32c(header).to_bytes(4, "little") + record + masked_crc32c(record).to_bytes(4, "little"))


def startup_s(python: str, logdir: Path) -> float:
    """Seconds from starting ``python -m tensorboard.main`` until ``/data/plugins_listing`` answers."""
    port = free_port()
    start = time.perf_counter()
    # cwd: not the repository, whose gradwatch.egg-info would lend its entry points to any Python started there
    proc = subprocess.Popen([python, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=logdir)
    try:
        deadline = start + 120
        while time.perf_counter() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugins_listing", timeout=5):  # noqa: S310
                    return time.perf_counter() - start
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("tensorboard did not start")
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--without", help="a Python whose environment has tensorboard but not this plugin")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results: dict[str, object] = {"layers": args.layers, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        t0 = time.perf_counter()
        write_run(logdir / "big", args.layers, args.steps)
        log.info("event file: %.0f MB", (logdir / "big" / "events.out.tfevents.0.bench").stat().st_size / 1e6)
        log.info("wrote %d x %d scalars in %.1f s", args.layers, args.steps, time.perf_counter() - t0)
        server = TensorBoard(logdir, "--samples_per_plugin", "scalars=1000000")
        try:
            t0 = time.perf_counter()
            def loaded() -> bool:
                status, series, _ = server.get("/data/plugin/scalars/scalars", run="big", tag="grad_norm/total")
                return status == 200 and bool(series) and series[-1][1] == args.steps - 1

            server.wait_until(loaded, "load the run", timeout=900)
            log.info("tensorboard loaded the run in %.1f s", time.perf_counter() - t0)
            params = {"run": "big", "metric": "grad_to_weight", "width": 1000, "height": 600}
            t0 = time.perf_counter()
            first = server.plugin("heatmap", **params, agg="median")
            results["first_request_s"] = round(time.perf_counter() - t0, 3)
            assert first["n_layers"] == args.layers and first["n_steps"] == args.steps, first["shape"]
            for agg in ("median", "min", "max"):
                times = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    body = server.get(PLUGIN + "heatmap", **params, agg=agg)
                    times.append(time.perf_counter() - t0)
                    assert body[0] == 200
                results[f"cached_{agg}_s"] = round(statistics.median(times), 3)
            results["response_cells"] = first["shape"]
        finally:
            server.stop()
        empty = logdir / "empty"
        empty.mkdir()
        results["startup_with_plugin_s"] = [round(startup_s(sys.executable, empty), 2) for _ in range(3)]
        if args.without:
            results["startup_without_plugin_s"] = [round(startup_s(args.without, empty), 2) for _ in range(3)]
    text = json.dumps(results, indent=2)
    log.info("%s", text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
