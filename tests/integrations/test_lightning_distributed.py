"""GradWatchCallback across two real CPU processes (gloo): DDP and FSDP2 (``ModelParallelStrategy``).

Each run is ``dist_script.py`` in a subprocess; Lightning's launcher starts the second rank. Both
ranks write what they recorded, and the tests compare the ranks with each other and with float64
statistics of the full (unsharded, gathered) tensors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parent / "dist_script.py"
#: Statistics of the (reduced) gradients and of the weights: identical on every rank.
GLOBAL_METRICS = ("grad_norm", "grad_mean_abs", "grad_max_abs", "grad_zero_frac", "nonfinite", "weight_norm",
                  "grad_to_weight", "update_ratio")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _run(mode: str, out: Path, timeout: float = 240) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), mode, str(out)], cwd=str(SCRIPT.parent), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: rank 1 too
        output, _ = proc.communicate()
        pytest.fail(f"{mode} run did not finish in {timeout}s (a rank hangs?)\n{output[-4000:]}")
    assert proc.returncode == 0, output[-6000:]
    return output


def _rank(out: Path, rank: int) -> tuple[pd.DataFrame, dict]:
    return pd.read_csv(out / f"rank{rank}.csv"), json.loads((out / f"rank{rank}.json").read_text())


def _metrics(df: pd.DataFrame) -> pd.Series:
    rows = df[df.metric.isin(GLOBAL_METRICS)]
    return rows.set_index(["step", "layer", "metric"])["value"].sort_index()


def _check_against_reference(df: pd.DataFrame, reference: dict) -> None:
    table = df[df.layer != "(total)"].pivot_table(index=["step", "layer"], columns="metric", values="value")
    assert len(reference) == len(table.index.get_level_values(0).unique())
    for step, layers in reference.items():
        for layer, stats in layers.items():
            for metric, value in stats.items():
                measured = table.loc[(int(step), layer), metric]
                if metric != "grad_norm" and pd.isna(measured):
                    continue  # measured on the slow-statistics cadence only
                assert measured == pytest.approx(value, rel=1e-5, abs=1e-9), (step, layer, metric)


def _rank_zero_logs(out: Path, steps: int = 8) -> None:
    csv_versions = list((out / "logs" / "csv").iterdir())
    assert len(csv_versions) == 1, csv_versions  # one run directory: only rank zero writes
    metrics = pd.read_csv(csv_versions[0] / "metrics.csv")
    assert "grad_norm/net.0" in metrics.columns and metrics["grad_norm/net.0"].notna().sum() == steps
    assert list((out / "logs" / "tb").rglob("events.out.tfevents*"))


def test_ddp_two_processes_agree_and_only_rank_zero_logs(tmp_path: Path) -> None:
    _run("ddp", tmp_path)
    df0, info0 = _rank(tmp_path, 0)
    df1, info1 = _rank(tmp_path, 1)
    assert info0["world_size"] == info1["world_size"] == 2
    assert info0["error"] is None and info1["error"] is None
    assert sorted(df0.step.unique()) == list(range(8))  # 64 samples / 2 ranks / batch 8 = 4 steps, 2 epochs
    pd.testing.assert_series_equal(_metrics(df0), _metrics(df1))  # identical on every rank, bit for bit
    _check_against_reference(df0, info0["reference"])
    assert info0["sinks"] and not info1["sinks"]  # only rank zero has sinks
    _rank_zero_logs(tmp_path)


def test_fsdp2_sharded_norms_match_the_unsharded_computation(tmp_path: Path) -> None:
    _run("fsdp2", tmp_path)
    df0, info0 = _rank(tmp_path, 0)
    df1, info1 = _rank(tmp_path, 1)
    assert info0["error"] is None and info1["error"] is None
    pd.testing.assert_series_equal(_metrics(df0), _metrics(df1), rtol=1e-6)
    # per-layer norms reduced across shards == float64 statistics of the gathered full tensors
    _check_against_reference(df0, info0["reference"])
    _check_against_reference(df1, info1["reference"])
    _rank_zero_logs(tmp_path)


def test_tensor_parallel_mixes_sharded_and_replicated_layers_correctly(tmp_path: Path) -> None:
    # net.0, net.2: column-parallel DTensors (each rank holds half); net.4: a plain layer replicated on
    # both ranks, which the reduction must count once, not twice.
    _run("tp", tmp_path)
    df0, info0 = _rank(tmp_path, 0)
    df1, info1 = _rank(tmp_path, 1)
    assert info0["error"] is None and info1["error"] is None
    pd.testing.assert_series_equal(_metrics(df0), _metrics(df1), rtol=1e-6)
    _check_against_reference(df0, info0["reference"])
    _rank_zero_logs(tmp_path, steps=16)  # no data parallelism: both ranks see all 8 batches per epoch


def test_ddp_fail_on_decided_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    # Only rank 1 sees a failing finding (e.g. dead units in its local batch); the decision is
    # reduced across ranks, so both stop at the same step instead of one waiting forever.
    _run("ddp_fail", tmp_path, timeout=180)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["stopped_at"] for r in results] == [2, 2]
    assert all(r["global_step"] == 2 for r in results)
    assert "another rank" in results[0]["message"]
    # the gloo group is destroyed at exit while the interpreter is alive (its worker threads joined): a
    # group left to interpreter finalization aborted this run now and then under load (SIGABRT,
    # "terminate called without an active exception")
    assert [r["group_alive_at_exit"] for r in results] == [False, False]


@pytest.mark.parametrize("where", ["before", "after"])
def test_fsdp2_watcher_failing_on_one_rank_detaches_every_rank_together_without_a_hang(tmp_path: Path,
                                                                                       where: str) -> None:
    # Rank 1's watcher fails at step 3, before or after that step's row reduction (a collective). It keeps
    # taking part until the other rank knows: both stop collecting at the same step, rank 0 with a warning
    # that names the cause, and nobody waits in the reduction until the collective timeout.
    from dist_script import DETACH_AT

    output = _run(f"fsdp2_detach_{where}", tmp_path, timeout=240)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["global_step"] == r1["global_step"] == 12  # 64 samples / 2 ranks / batch 8 = 4 steps, 3 epochs: all ran
    assert f"rank-local gradwatch failure {where} the reduction" in r1["error"]
    # rank 0 learned it from the reduction itself, not from a collective timeout (which also fails the run)
    assert "PeerWatcherFailed" in r0["error"] and "another rank" in r0["error"]
    # every_n_steps=2: collected steps 0, 2, 4, ...; the first collected step from DETACH_AT on is 4. Before
    # the reduction, rank 1 takes part at step 4 itself; after it, step 4 is recorded and rank 1 takes part
    # at the next collected step, 6. Either way both ranks recorded the same steps.
    first = next(s for s in range(DETACH_AT, 12) if s % 2 == 0)
    recorded = list(range(0, first if where == "before" else first + 2, 2))
    assert r0["steps"] == r1["steps"] == recorded
    failures = [line for line in output.splitlines() if "gradwatch: watching" in line and "failed (" in line]
    stopped = [line for line in output.splitlines() if "gradwatch: watching" in line and "stopped:" in line]
    assert len(failures) == 1 and len(stopped) == 1, output[-4000:]
