"""`gradwatch report LOGDIR`: offline diagnosis from event files equals the live one; bad input is handled."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from gw_testing import mlp, train, vector_task
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch.cli import main
from gradwatch.logs import check_event_file, find_runs, read_logdir, read_run


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory):
    """Two runs in one log directory: a deep sigmoid MLP (vanishing) and a shallow ReLU MLP (healthy)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("logs")
    live = {}
    for name, act, depth, lr in (("deep_sigmoid", nn.Sigmoid, 12, 0.5), ("shallow_relu", nn.ReLU, 3, 0.05)):
        torch.manual_seed(0)
        model = mlp(act, depth)
        with gradwatch.watch(model, log_dir=root / name, activation_every_n_steps=10, figure_every_n_steps=0) as w:
            train(model, vector_task(), 60, watcher=w, lr=lr)
            live[name] = (w.diagnose(), w.to_dataframe())
    return root, live


def test_offline_diagnosis_equals_the_live_one(logdir) -> None:
    root, live = logdir
    runs = {r.name: r for r in read_logdir(root)}
    assert set(runs) == {"deep_sigmoid", "shallow_relu"}
    for name, (diag, df) in live.items():
        run = runs[name]
        assert run.problems == []
        offline = run.diagnose()
        assert offline.signature() == diag.signature()
        assert [f.message for f in offline.findings] == [f.message for f in diag.findings]
        assert [f.evidence for f in offline.findings] == [f.evidence for f in diag.findings]
        # the whole report, per-layer table included (NaN != NaN in rows); only the live one can
        # render fix code for the model it holds
        assert str(offline) == str(dataclasses.replace(diag, code=""))
        assert [r.name for r in offline.layers] == [r.name for r in diag.layers] and offline.steps == diag.steps
        # the frame read back holds every value of the in-memory history, bit for bit
        merged = df.merge(run.frame, on=["step", "layer", "metric"], how="left", suffixes=("_live", "_log"))
        assert merged["value_log"].notna().all()
        assert (merged["value_live"] == merged["value_log"]).all()
        assert (merged["depth_live"] == merged["depth_log"]).all()
    assert runs["deep_sigmoid"].diagnose().by_kind("vanishing")
    assert runs["shallow_relu"].diagnose().healthy


def test_report_names_the_vanishing_early_layers_and_writes_png_and_csv(logdir, tmp_path, capsys) -> None:
    root, live = logdir
    assert main(["report", str(root), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    sig_part, relu_part = out.split("== run shallow_relu")
    assert "== run deep_sigmoid" in sig_part and "vanishing" in sig_part
    vanishing = live["deep_sigmoid"][0].by_kind("vanishing")[0]
    assert vanishing.layers[0] == "0"  # the first Linear: early layers are named, first first
    assert "    layers: " + ", ".join(vanishing.layers) in sig_part
    assert ": healthy - no vanishing" in relu_part and "[CRITICAL]" not in relu_part and "[WARNING]" not in relu_part
    for name in ("deep_sigmoid", "shallow_relu"):
        assert (tmp_path / name / "gradient_flow.png").read_bytes()[:4] == b"\x89PNG"
        csv = pd.read_csv(tmp_path / name / "history.csv")
        assert list(csv.columns) == ["step", "layer", "metric", "value", "depth"]
        assert len(csv) >= len(live[name][1])


@pytest.mark.slow  # a `python -m gradwatch` subprocess
def test_python_dash_m_gradwatch_report(logdir, tmp_path) -> None:
    root, _ = logdir
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "report", str(root / "deep_sigmoid"), "--no-files"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[CRITICAL] vanishing" in proc.stdout
    assert not list(tmp_path.iterdir())  # --no-files wrote nothing


def test_no_gradwatch_events_is_a_clear_message_and_a_nonzero_exit(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 1
    err = capsys.readouterr().err
    assert "no gradwatch events" in err and "No TensorBoard event files" in err

    other = tmp_path / "other"
    with SummaryWriter(str(other)) as writer:  # somebody else's metrics only
        writer.add_scalar("accuracy", 0.9, 1)
    assert main(["report", str(other)]) == 1
    err = capsys.readouterr().err
    assert "no gradwatch events" in err and "hold no gradwatch tags" in err

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_truncated_corrupted_and_foreign_files_are_reported_never_a_traceback(logdir, tmp_path, capsys) -> None:
    root, _ = logdir
    (src,) = (root / "deep_sigmoid").glob("events.out.tfevents.*")
    data = src.read_bytes()
    for name, content in (
        ("truncated", data[: len(data) // 2]),
        ("corrupted", data[:20000] + bytes(b ^ 0xFF for b in data[20000:20010]) + data[20010:]),
        ("foreign", b"this is not an event file, just unlucky naming" * 20),
        ("empty", b""),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / src.name).write_bytes(content)
    checks = {p.parent.name: check_event_file(p) for p in tmp_path.glob("*/events.out.tfevents.*")}
    assert "truncated" in checks["truncated"].problem and checks["truncated"].readable
    assert checks["foreign"].readable is False and "not a TensorBoard event file" in checks["foreign"].problem
    assert checks["empty"].readable is False and "empty" in checks["empty"].problem
    assert checks["corrupted"].problem is None  # the framing is intact; the payload checksum is what fails

    assert main(["report", str(tmp_path), "--no-files"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "warning: events.out.tfevents" in captured.out and "truncated: the last record is incomplete" in captured.out
    assert "corrupted record (checksum mismatch)" in captured.out
    assert "not a TensorBoard event file" in captured.out and "empty file" in captured.out
    corrupted = read_run(tmp_path / "corrupted")
    assert corrupted.has_gradwatch_data and corrupted.frame["step"].max() < 59


def test_runs_are_found_recursively_and_a_single_run_directory_works(logdir, tmp_path) -> None:
    root, _ = logdir
    nested = tmp_path / "a" / "b"
    shutil.copytree(root / "shallow_relu", nested / "run1")
    assert find_runs(tmp_path) == [nested / "run1"]
    (run,) = read_logdir(nested / "run1")
    assert run.name == "." and run.has_gradwatch_data
    with pytest.raises(FileNotFoundError):
        find_runs(tmp_path / "nope")


def test_demo_subcommand(capsys) -> None:
    if importlib.util.find_spec("gradwatch.demo") is None:
        assert main(["demo", "--anything"]) == 2
        assert "demo is not part of this installation" in capsys.readouterr().err
    else:  # passed on to gradwatch.demo.main (its own tests cover what it does)
        assert main(["demo", "--help"]) == 0
        assert "usage: gradwatch demo" in capsys.readouterr().out


def test_usage_errors(capsys) -> None:
    assert main([]) == 2
    assert main(["report"]) == 2
    assert main(["--version"]) == 0
    assert "gradwatch" in capsys.readouterr().out


def test_a_prefixed_sink_sharing_a_writer_with_other_metrics_is_read_back(tmp_path) -> None:
    from gradwatch.tensorboard import TensorBoardSink

    writer = SummaryWriter(str(tmp_path / "shared"))
    model = mlp(nn.ReLU, 3)
    with gradwatch.watch(model, sinks=[TensorBoardSink(writer, prefix="gw/", figure_every_n_steps=0)]) as w:
        for step in range(6):
            train(model, vector_task(step), 1, watcher=w)
            writer.add_scalar("grad_norm/total", 123.0, step)  # the user's own tag of the same name
        df = w.to_dataframe()
    writer.close()
    run = read_run(tmp_path / "shared")
    assert run.meta["prefix"] == "gw/"
    norms = run.frame[(run.frame["layer"] == "(total)") & (run.frame["metric"] == "grad_norm")]["value"]
    assert len(norms) == 6 and 123.0 not in set(norms)  # the user's series is not mistaken for gradwatch's
    assert set(run.frame["layer"]) - {"(total)"} == set(df["layer"]) - {"(total)"}
