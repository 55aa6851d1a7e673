"""Untrusted inputs: ``gradwatch report`` on damaged, empty, foreign or crafted event files reports what it
could read and what it skipped, never a traceback; fix records that are malformed or name modules
that do not exist are rejected with a clear error before anything changes (``replay`` is all-or-nothing).
"""

from __future__ import annotations

import copy
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gw_testing import mlp, train, vector_task
from hw_helpers import assert_identical, state_bits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch import tags as T
from gradwatch.cli import main
from gradwatch.findings import Diagnosis, Finding
from gradwatch.fixes import RecordError, apply_fixes, replay
from gradwatch.layers import observe_structure

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def event_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    """A real gradwatch run (scalars, histograms, layout, text, figure, metadata): its file name and bytes."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = mlp(nn.Sigmoid, 6)
    with gradwatch.watch(model, log_dir=root, histogram_every_n_steps=5, activation_every_n_steps=5,
                         diagnose_every_n_steps=10, figure_every_n_steps=0) as w:
        train(model, vector_task(), 30, watcher=w, lr=0.5)
    (src,) = root.glob("events.out.tfevents.*")
    return src.name, src.read_bytes()


def _records(data: bytes) -> list[tuple[int, int]]:
    """(offset, total length) of every TFRecord in an event file."""
    out, off = [], 0
    while off + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[off:off + 8])
        out.append((off, 12 + n + 4))
        off += 12 + n + 4
    return out


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    """The real console entry point, in its own process (as a user runs it)."""
    exe = Path(sys.executable).parent / "gradwatch"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gradwatch"]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=180)


def _foreign_run(path: Path) -> None:
    writer = SummaryWriter(str(path))
    for step in range(5):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
        writer.add_histogram("weights", torch.randn(100), step)
    writer.close()


@pytest.mark.slow  # one `gradwatch report` subprocess per damaged run (an interpreter start-up each)
def test_cli_reports_what_it_read_and_skipped_from_damaged_runs(event_bytes: tuple[str, bytes], tmp_path: Path) -> None:
    name, data = event_bytes
    records = _records(data)
    mid_off, mid_len = records[len(records) // 2]
    damaged = {
        "intact": data,
        "truncated_mid_record": data[: mid_off + mid_len // 2],
        "truncated_mid_header": data[: mid_off + 5],
        "bad_length_field": data[:mid_off] + struct.pack("<Q", 2**40) + data[mid_off + 8:],
        "flipped_payload": data[: mid_off + 14] + bytes(b ^ 0x5A for b in data[mid_off + 14: mid_off + 18]) + data[mid_off + 18:],
        "garbage_tail": data + b"\x00\x01garbage" * 50,
    }
    root = tmp_path / "logs"
    for run, content in damaged.items():
        (root / run).mkdir(parents=True)
        (root / run / name).write_bytes(content)
    # a run whose directory also holds a damaged copy of the writer's file and an empty one
    (root / "mixed").mkdir()
    (root / "mixed" / name).write_bytes(data)
    (root / "mixed" / (name + ".1")).write_bytes(data[: len(data) // 3])
    (root / "mixed" / "events.out.tfevents.0.empty").write_bytes(b"")
    _foreign_run(root / "foreign_tensorboard")
    (root / "not_events").mkdir()
    (root / "not_events" / "events.out.tfevents.bogus").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)

    result = _cli(["report", str(root), "--no-files"])
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out[-3000:]
    assert result.returncode == 0
    for run in ("intact", "truncated_mid_record", "truncated_mid_header", "bad_length_field", "flipped_payload",
                "garbage_tail", "mixed"):
        assert f"== run {run} " in result.stdout, run  # every run with gradwatch data is reported
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert any("truncated" in w for w in warnings)
    assert any("corrupted record (checksum mismatch)" in w for w in warnings)  # the flipped payload
    assert any("corrupted record header" in w or "truncated" in w for w in warnings)  # the bad length field
    assert any("empty file" in w for w in warnings)
    # the runs without gradwatch data are listed as skipped, with why
    assert "foreign_tensorboard" in result.stdout and "not_events" in result.stdout
    assert "not a TensorBoard event file" in result.stdout

    only_bad = tmp_path / "only_bad"
    (only_bad / "empty").mkdir(parents=True)
    (only_bad / "empty" / name).write_bytes(b"")
    _foreign_run(only_bad / "foreign")
    result = _cli(["report", str(only_bad)])
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 1
    assert "no gradwatch events" in result.stderr and "empty file" in result.stderr and "foreign" in result.stderr


@FUZZ
@given(data=st.data())
def test_report_never_raises_on_mutated_event_files(event_bytes: tuple[str, bytes], tmp_path_factory, data) -> None:
    name, original = event_bytes
    content = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "zero_run", "duplicate"]))
        pos = data.draw(st.integers(0, max(0, len(content) - 1)))
        if not content and kind != "insert":
            continue  # an earlier truncation emptied the file: only an insertion can change it
        if kind == "flip":
            content[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del content[pos:]
        elif kind == "insert":
            content[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
        elif kind == "zero_run":
            content[pos:pos + 64] = bytes(len(content[pos:pos + 64]))
        else:
            content += content[pos:pos + 200]
    root = tmp_path_factory.mktemp("fuzz")
    (root / name).write_bytes(bytes(content))
    rc = main(["report", str(root), "--no-files"])  # never raises; 0 (reported) or 1 (nothing usable)
    assert rc in (0, 1)


def _meta_run(path: Path, meta: object) -> None:
    """A run with a few gradwatch scalars and a crafted ``gradwatch/meta`` record."""
    writer = SummaryWriter(str(path))
    payload = (meta if isinstance(meta, bytes) else json.dumps(meta).encode())
    tensor = TensorProto(dtype=7, string_val=[payload])  # DT_STRING
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="gradwatch_meta", content=b"{}"))
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=T.META_TAG, tensor=tensor, metadata=metadata)]), 0)
    for step in range(8):
        writer.add_scalar("grad_norm/total", 1.0, step)
        writer.add_scalar("grad_norm/00.net.0", 0.5, step)
        writer.add_scalar("grad_to_weight/00.net.0", 0.01, step)
        writer.add_scalar("grad_norm/01.net.2", 0.5, step)
    writer.close()


BAD_METAS = [
    b"\xff\xfe not utf-8",
    b"{not json",
    [1, 2, 3],
    "a string",
    {"layers": "net.0"},
    {"layers": [{"depth": 0}]},                                    # a layer without a name
    {"layers": [{"name": 5, "fan_in": "wide", "numel": None}]},
    {"layers": [None, 3]},
    {"activations": [{"name": "a", "kind": 7}], "activation_every_n_steps": "often"},
    {"prefix": 42},
    {"context": ["not", "a", "dict"], "thresholds": {"window": -1}},
    {"thresholds": "strict", "activation_every_n_steps": 0},
    {"layers": [{"name": "net.0", "depth": "first", "fan_in": -3, "numel": 1e300, "recurrent": "yes"}]},
]


@pytest.mark.parametrize("meta", BAD_METAS, ids=range(len(BAD_METAS)))
def test_report_survives_malformed_run_metadata(tmp_path: Path, meta: object, capsys: pytest.CaptureFixture) -> None:
    _meta_run(tmp_path / "run", meta)
    rc = main(["report", str(tmp_path), "--no-files"])
    out = capsys.readouterr()
    assert rc == 0, out  # the scalars are still read and diagnosed
    assert "Traceback" not in out.out + out.err
    assert "warning: " in out.out and "metadata" in out.out  # and what was skipped is said


# -- fix records ----------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid())
        self.rnn = nn.RNN(8, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.body(x).unsqueeze(1))
        return self.head(out[:, -1])


@pytest.fixture(scope="module")
def record() -> dict:
    """A real record of four chained structural fixes (residual, batchnorm, activation swap, RNN swap)."""
    torch.manual_seed(0)
    model = Net()
    diagnosis = Diagnosis(
        findings=(
            Finding("vanishing", ("body.2", "body.4"), "critical", "v", {}, ("residual",)),
            Finding("saturation", ("body.1", "body.5"), "warning", "s", {"feeding_layers": ["body.0", "body.4"]},
                    ("insert_batchnorm",)),
            Finding("vanishing", ("body.0",), "critical", "v", {"activations": ["body.1", "body.3", "body.5"]},
                    ("swap_activation",)),
            Finding("vanishing", ("rnn",), "critical", "t", {}, ("lstm_gru",)),
        ),
        structure=observe_structure(Net(), torch.randn(3, 4)),
    )
    report = apply_fixes(model, diagnosis, optimizer=torch.optim.Adam(model.parameters()))
    assert all(c.status == "applied" for c in report.changes), str(report)
    return json.loads(report.to_json())


def _fresh() -> Net:
    torch.manual_seed(1)
    return Net()


def _ops(rec: dict) -> list[tuple[int, int]]:
    return [(i, j) for i, c in enumerate(rec["changes"]) for j in range(len(c["ops"]))]


def test_the_record_replays_and_a_record_naming_missing_modules_changes_nothing(record: dict) -> None:
    model = _fresh()
    replay(model, record)  # sanity: the real record fits
    for i, j in _ops(record):
        bad = copy.deepcopy(record)
        op = bad["changes"][i]["ops"][j]
        op["path"] = "decoder.block.7"
        if "span" in op:  # a residual names every module it wraps
            op["span"] = ["decoder.block.7", *(f"decoder.block.{8 + k}" for k in range(len(op["span"]) - 1))]
        model = _fresh()
        before = state_bits(model)
        with pytest.raises(RecordError, match=r"no submodule 'decoder.block.7'.*nothing was changed"):
            replay(model, bad)
        assert_identical(before, state_bits(model))
    # the last op fails after all the others were applied: every one of them is undone
    i, j = _ops(record)[-1]
    bad = copy.deepcopy(record)
    bad["changes"][i]["ops"][j]["expect"] = "GRU"
    model = _fresh()
    before = state_bits(model)
    with pytest.raises(RecordError, match="expects 'GRU' there"):
        replay(model, bad)
    assert_identical(before, state_bits(model))


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
                  st.sampled_from(["body.2", "body", "rnn", "(root)", "", "body.2.weight", "head.0", "ReLU", "BatchNorm1d", "lstm"]))


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(data=st.data())
def test_replay_rejects_any_malformed_record_cleanly_and_all_or_nothing(record: dict, data) -> None:
    """Random edits anywhere in a valid record (a value replaced by junk, a key deleted, a list emptied):
    ``replay`` either applies it or raises ``RecordError`` -- never another exception -- and after an
    error the model is bit-for-bit what it was."""
    bad = copy.deepcopy(record)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(bad) if p]
        where = data.draw(st.sampled_from(paths))
        parent = bad
        for k in where[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = data.draw(_JUNK)
    model = _fresh()
    before = state_bits(model)
    as_json = data.draw(st.booleans())
    try:
        replay(model, json.dumps(bad) if as_json else bad)
    except RecordError as err:
        assert str(err)  # a message, naming what is wrong
        assert_identical(before, state_bits(model))
    else:
        # accepted: the result is a working model (every module it built fits its neighbours)
        model(torch.randn(3, 4))


@FUZZ
@given(cut=st.floats(0.0, 0.999))
def test_a_truncated_record_file_is_rejected_as_not_json(record: dict, cut: float) -> None:
    text = json.dumps(record)
    model = _fresh()
    before = state_bits(model)
    with pytest.raises(RecordError):
        replay(model, text[: int(len(text) * cut)])
    assert_identical(before, state_bits(model))


def test_non_finite_numbers_in_a_record_are_rejected() -> None:
    """JSON accepts NaN/Infinity: a record must not build a module with a NaN residual scale or epsilon."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    diag = Diagnosis(findings=(Finding("vanishing", ("2",), "critical", "v", {}, ("residual",)),),
                     structure=observe_structure(model, torch.randn(3, 4)))
    rec = json.loads(apply_fixes(copy.deepcopy(model), diag).to_json())
    (op,) = [op for c in rec["changes"] for op in c["ops"]]
    assert op["op"] == "wrap_residual"
    for value in (math.nan, math.inf, -math.inf):
        bad = copy.deepcopy(rec)
        [o for c in bad["changes"] for o in c["ops"]][0]["alpha_init"] = value
        fresh = copy.deepcopy(model)
        before = state_bits(fresh)
        with pytest.raises(RecordError, match="alpha_init"):
            replay(fresh, json.dumps(bad))
        assert_identical(before, state_bits(fresh))
