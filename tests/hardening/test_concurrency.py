"""Concurrency and processes: two watchers in one process, a watcher in a training thread, and
two-process DDP runs in which one rank fails (``ddp_raise_script.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from gw_testing import mlp, vector_task
from hw_helpers import errors, gradwatch_records, scalar_steps
from torch import nn

import gradwatch
from gradwatch.logs import read_run

HERE = Path(__file__).resolve().parent
WATCH = {"activation_every_n_steps": 3, "histogram_every_n_steps": 4, "slow_stats_every_n": 2, "figure_every_n_steps": 0}


def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return mlp(nn.ReLU, 4), mlp(nn.Tanh, 3, width=24)


def step(model: nn.Module, opt: torch.optim.Optimizer, watcher: gradwatch.GradWatcher, batch, i: int) -> None:
    x, y = batch(i)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    watcher.step(loss, global_step=i)
    opt.step()
    opt.zero_grad()


def solo(model: nn.Module, log_dir: Path, steps: int = 12) -> pd.DataFrame:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = vector_task()
    with gradwatch.watch(model, log_dir=log_dir, **WATCH) as w:
        for i in range(steps):
            step(model, opt, w, batch, i)
    return w.to_dataframe()


def test_two_watchers_on_two_models_in_one_process_do_not_interfere(tmp_path: Path) -> None:
    ref_a, ref_b = (solo(m, tmp_path / f"solo{k}") for k, m in enumerate(models()))
    a, b = models()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.05), torch.optim.SGD(b.parameters(), lr=0.05)
    batch = vector_task()
    with gradwatch_records() as records:
        with gradwatch.watch(a, log_dir=tmp_path / "a", **WATCH) as wa, gradwatch.watch(b, log_dir=tmp_path / "b", **WATCH) as wb:
            for i in range(12):  # interleaved, even within a step: forward A, forward B, backward B, backward A
                xa, ya = batch(i)
                loss_a = F.cross_entropy(a(xa), ya)
                loss_b = F.cross_entropy(b(xa), ya)
                loss_b.backward()
                loss_a.backward()
                wb.step(loss_b, global_step=i)
                wa.step(loss_a, global_step=i)
                opt_a.step()
                opt_b.step()
                opt_a.zero_grad()
                opt_b.zero_grad()
    assert not errors(records) and wa.error is None and wb.error is None
    pd.testing.assert_frame_equal(wa.to_dataframe(), ref_a)
    pd.testing.assert_frame_equal(wb.to_dataframe(), ref_b)
    for name in ("a", "b"):
        assert scalar_steps(tmp_path / name) == list(range(12))
        assert read_run(tmp_path / name).problems == []


def test_two_models_sharing_a_module_each_see_their_own_forward(tmp_path: Path) -> None:
    """A shared encoder watched through two models (a siamese or teacher/student setup): each watcher
    records its own model's statistics, and a forward of one model does not end the other's hooks."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    a = nn.Sequential(encoder, nn.Linear(32, 4))
    b = nn.Sequential(encoder, nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    params = list({id(p): p for p in [*a.parameters(), *b.parameters()]}.values())
    opt = torch.optim.SGD(params, lr=0.05)
    batch = vector_task()
    with gradwatch_records() as records:
        with gradwatch.watch(a, activation_every_n_steps=1) as wa, gradwatch.watch(b, activation_every_n_steps=1) as wb:
            for i in range(6):
                x, y = batch(i)
                loss = F.cross_entropy(a(x), y) + F.cross_entropy(b(x * 10.0), y)  # b sees 10x louder inputs
                loss.backward()
                wa.step(global_step=i)
                wb.step(global_step=i)
                opt.step()
                opt.zero_grad()
    assert not errors(records) and wa.error is None and wb.error is None
    assert [layer.name for layer in wa.layers] == ["0.0", "1"] and [layer.name for layer in wb.layers] == ["0.0", "1", "3"]
    rms_a = wa.to_dataframe().query("metric == 'act_rms' and layer == '0.0'")["value"].to_numpy()
    rms_b = wb.to_dataframe().query("metric == 'act_rms' and layer == '0.0'")["value"].to_numpy()
    assert len(rms_a) == len(rms_b) == 6
    assert (rms_b > 5 * rms_a).all()  # each watcher measured the encoder's output in its own model's forward


def test_watcher_in_a_training_thread(tmp_path: Path) -> None:
    """Training (and its watcher) in a ``threading.Thread`` while the main thread trains another watched
    model: the same statistics as the same runs one after the other, logs readable, clean close."""
    ref_a, ref_b = (solo(m, tmp_path / f"solo{k}", steps=20) for k, m in enumerate(models()))
    a, b = models()
    results: dict[str, object] = {}

    def train(name: str, model: nn.Module) -> None:
        try:
            results[name] = solo(model, tmp_path / name, steps=20)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            results[name] = exc

    with gradwatch_records() as records:
        thread = threading.Thread(target=train, args=("a", a), name="trainer")
        thread.start()
        train("b", b)
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert not errors(records)
    pd.testing.assert_frame_equal(results["a"], ref_a)
    pd.testing.assert_frame_equal(results["b"], ref_b)
    assert scalar_steps(tmp_path / "a") == list(range(20))


# -- two processes ------------------------------------------------------------------------------------
def _run_ddp(mode: str, out: Path, timeout: float = 150) -> tuple[int, str, dict[int, dict]]:
    pytest.importorskip("lightning")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(HERE / "ddp_raise_script.py"), mode, str(out)], cwd=str(HERE), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 1 too
        output, _ = proc.communicate()
        pytest.fail(f"{mode}: the run hung for {timeout}s (beyond the strategy's timeout)\n{output[-4000:]}")
    print(f"{mode}: {time.monotonic() - start:.1f}s")
    ranks = {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1) if (out / f"rank{r}.json").exists()}
    return proc.returncode, output, ranks


def _gradwatch_errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if "gradwatch" in line and "failed" in line]


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_rank_one_raises_rank_zero_ends_promptly_with_a_clear_message(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from ddp_raise_script import FAIL_AT, TIMEOUT_S

    rc, output, ranks = _run_ddp("raise1", tmp_path)
    assert rc != 0
    assert f"training_step failed on rank 1 at step {FAIL_AT}" in output  # the real cause is in rank zero's output
    assert "remote worker crashing" in ranks[0]["error"]  # rank zero's own error names a crashed peer
    assert ranks[0]["seconds"] < TIMEOUT_S  # it did not sit out the collective timeout
    assert not _gradwatch_errors(output)  # gradwatch adds no error of its own
    for r in (0, 1):
        assert ranks[r]["watcher_closed"] and ranks[r]["watcher_error"] is None
    log_dir = tmp_path / "logs" / "tb" / "version_0"
    assert scalar_steps(log_dir) == list(range(FAIL_AT))  # rank zero's events up to the fault, flushed at close
    assert read_run(log_dir).problems == []


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_rank_zero_raises_and_the_other_rank_does_not_hang(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from ddp_raise_script import FAIL_AT, TIMEOUT_S

    rc, output, ranks = _run_ddp("raise0", tmp_path)
    assert rc != 0
    assert ranks[0]["error"] == f"RuntimeError: training_step failed on rank 0 at step {FAIL_AT}"
    assert ranks[0]["watcher_closed"] and ranks[0]["watcher_error"] is None
    if 1 in ranks:  # rank 1 either got the closed connection or was stopped by the launcher
        assert ranks[1]["seconds"] < 2 * TIMEOUT_S
    assert not _gradwatch_errors(output)
    assert scalar_steps(tmp_path / "logs" / "tb" / "version_0") == list(range(FAIL_AT))


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_gradwatch_failing_on_one_rank_never_stops_training(tmp_path: Path) -> None:
    """gradwatch breaks on rank 1 only: that watcher detaches with one message, and every rank still
    takes part in gradwatch's own collectives (the ``fail_on`` decision), so training runs to the end."""
    rc, output, ranks = _run_ddp("detach1", tmp_path)
    assert rc == 0, output[-4000:]
    assert ranks[0]["error"] is None and ranks[1]["error"] is None
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 18
    assert ranks[0]["watcher_error"] is None and ranks[0]["collected"] == 18
    assert "rank-local gradwatch failure" in ranks[1]["watcher_error"]
    assert len(_gradwatch_errors(output)) == 1
    assert scalar_steps(tmp_path / "logs" / "tb" / "version_0") == list(range(18))
