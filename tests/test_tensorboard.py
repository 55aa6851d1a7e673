"""TensorBoardSink on real training runs, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gw_testing import mlp, train, vector_task
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch import tags as T
from gradwatch.activations import ACT_METRICS
from gradwatch.histograms import N_KEYS, bin_on_device, count_keys_atomically, launch_bins
from gradwatch.tensorboard import TensorBoardSink

EVERY = 5


def accumulate(path: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(path), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    return acc


def scalar_map(acc: ea.EventAccumulator) -> dict[str, dict[int, float]]:
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory: pytest.TempPathFactory):
    """A small ReLU MLP trained for 21 steps with every TensorBoard output on a short cadence."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    logdir = tmp_path_factory.mktemp("tb") / "relu"
    model = mlp(nn.ReLU, 4)
    numel = {name: sum(p.numel() for p in m.parameters(recurse=False)) for name, m in model.named_modules()}
    with gradwatch.watch(model, log_dir=logdir, histogram_every_n_steps=EVERY, activation_every_n_steps=EVERY,
                         figure_every_n_steps=10, diagnose_every_n_steps=EVERY, on_error="raise") as w:
        train(model, vector_task(), 21, watcher=w)
        df = w.to_dataframe()
        layers = [layer.name for layer in w.layers]
    acts = df[df["metric"].isin(ACT_METRICS)].sort_values("depth", kind="stable")["layer"].unique().tolist()
    return logdir, df, layers, acts, numel, accumulate(logdir)


def expected_tag(row, layers: list[str], acts: list[str]) -> str:
    if row.layer == T.TOTAL_LAYER:
        return T.total_tag(row.metric)
    if row.metric in ACT_METRICS:
        i = acts.index(row.layer)
        return T.layer_tag(row.metric, i, row.layer, T.depth_width(len(acts)))
    return T.layer_tag(row.metric, layers.index(row.layer), row.layer, T.depth_width(len(layers)))


def test_scalars_match_the_in_memory_history(relu_run) -> None:
    _, df, layers, acts, _, acc = relu_run
    scalars = scalar_map(acc)
    assert {"grad_norm/total", "loss/total", "grad_norm/00.0", "grad_to_weight/00.0", "grad_max_abs/00.0",
            "grad_zero_frac/00.0", "nonfinite/00.0", "dead_frac/00.1"} <= set(scalars)
    assert len(df) > 300
    for row in df.itertuples(index=False):
        tag = expected_tag(row, layers, acts)
        assert tag in scalars, tag
        assert scalars[tag][row.step] == pytest.approx(np.float32(row.value), rel=1e-7, abs=0), (tag, row.step)
    # nothing written that the history does not hold (apart from the histogram-step counts)
    written = sum(len(v) for t, v in scalars.items() if t.split("/")[0] not in T.HIST_COUNTS)
    assert written == len(df)


def test_layer_tags_sort_from_input_to_output() -> None:
    class Reversed(nn.Module):  # registration order is the reverse of execution order
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(11)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in reversed(self.blocks):
                x = torch.tanh(block(x))
            return x

    model = Reversed()
    sink_records = []

    class Keep:
        def write_step(self, record): sink_records.append(record)
        def write_histograms(self, step, layers): pass
        def write_diagnosis(self, step, diagnosis): pass
        def flush(self): pass
        def close(self): pass

    with gradwatch.watch(model, sinks=[Keep()]) as w:
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
            w.step()
    names = sink_records[-1].layers
    assert names == [f"blocks.{i}" for i in reversed(range(11))]
    width = T.depth_width(len(names))
    tags = [T.layer_tag("grad_norm", i, n, width) for i, n in enumerate(names)]
    assert sorted(tags) == tags  # string order == depth order, past 10 layers
    for i, n in enumerate(names):
        parsed = T.parse_tag(tags[i])
        assert (parsed.metric, parsed.layer, parsed.depth) == ("grad_norm", n, i)
    assert T.parse_tag("grad_norm/03.0.weight_like").layer == "0.weight_like"
    assert T.parse_tag("gw/loss/total", prefix="gw/") == T.ParsedTag("loss", T.TOTAL_LAYER, None)
    assert T.parse_tag("accuracy") is None and T.parse_tag("grad_norm/net.4") is None


def test_histograms_count_every_gradient_element(relu_run) -> None:
    _, _, layers, _, numel, acc = relu_run
    hist_tags = acc.Tags()["histograms"]
    width = T.depth_width(len(layers))
    expected_steps = [0, 5, 10, 15, 20]
    for i, name in enumerate(layers):
        key = T.layer_key(i, name, width)
        values = acc.Histograms(f"grad_hist/{key}")
        logs = acc.Histograms(f"grad_log10abs/{key}")
        zeros = {e.step: e.value for e in acc.Scalars(f"hist_zeros/{key}")}
        nans = {e.step: e.value for e in acc.Scalars(f"hist_nan/{key}")}
        infs = {e.step: e.value for e in acc.Scalars(f"hist_inf/{key}")}
        assert [e.step for e in values] == expected_steps
        assert [e.step for e in logs] == expected_steps
        for v, lg in zip(values, logs, strict=True):
            h = v.histogram_value
            assert sum(h.bucket) == numel[name] == h.num
            assert h.min <= h.bucket_limit[0] and h.bucket_limit[-1] == h.max
            assert list(h.bucket_limit) == sorted(h.bucket_limit)
            hl = lg.histogram_value
            assert sum(hl.bucket) + zeros[v.step] + nans[v.step] + infs[v.step] == numel[name]
            assert -46 < hl.min <= hl.max < 39  # log10 of float32 magnitudes
    assert len(hist_tags) == 2 * len(layers)


def test_histograms_match_a_float64_binning() -> None:
    torch.manual_seed(1)
    x = torch.randn(3000, dtype=torch.float64) * 10.0 ** torch.randint(-9, 2, (3000,)).double()
    x[:7] = 0.0
    (h,) = bin_on_device([[x.float()]])
    xs = x.float().double().numpy()
    limits = np.array(h.values.bucket_limits)
    lefts = np.concatenate([[h.values.min], limits[:-1]])
    assert h.values.min == xs.min() and h.values.max == xs.max()
    # sum and sum of squares come from bucket midpoints: within half a bucket (6.25 %) per value
    assert abs(h.values.sum - xs.sum()) <= 0.0625 * np.abs(xs).sum()
    assert h.values.sum_squares == pytest.approx((xs**2).sum(), rel=0.13)
    # every value lies in exactly the bucket whose counts include it: rebin with numpy
    idx = np.searchsorted(limits, xs, side="left")
    assert np.array_equal(np.bincount(np.minimum(idx, len(limits) - 1), minlength=len(limits)), h.values.bucket_counts)
    assert (lefts <= limits).all()
    nz = np.abs(xs[xs != 0])
    log_limits = np.array(h.log10_abs.bucket_limits)
    idx = np.searchsorted(log_limits[:-1], np.log10(nz), side="right")
    counts = np.bincount(idx, minlength=len(log_limits))
    assert np.array_equal(counts, h.log10_abs.bucket_counts)
    assert h.zeros == 7 and h.nan == h.inf == 0 and h.numel == 3000


def test_nan_and_inf_never_break_histograms(tmp_path: Path) -> None:
    model = mlp(nn.ReLU, 3)
    first = model[0].weight

    def poison(step: int) -> None:
        if step == 0:
            first.grad[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])

    with gradwatch.watch(model, log_dir=tmp_path, histogram_every_n_steps=1, figure_every_n_steps=0, on_error="raise") as w:
        train(model, vector_task(), 1, watcher=w, before_step=poison)
    acc = accumulate(tmp_path)
    h = acc.Histograms("grad_hist/00.0")[0].histogram_value
    assert all(math.isfinite(v) for v in (h.min, h.max, h.sum, h.sum_squares))
    assert sum(h.bucket) == first.numel() + model[0].bias.numel() - 3
    assert acc.Scalars("hist_nan/00.0")[0].value == 1 and acc.Scalars("hist_inf/00.0")[0].value == 2
    assert acc.Scalars("nonfinite/00.0")[0].value == 3


def test_layout_figure_text_and_metadata_are_written(relu_run) -> None:
    _, _, layers, _, _, acc = relu_run
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "gradwatch"
    charts = {c.title: list(c.multiline.tag) for c in category.chart}
    import re

    scalar_tags = acc.Tags()["scalars"]
    norm_chart = [t for t in scalar_tags if any(re.search(rx, t) for rx in charts["gradient norm per layer (input to output)"])]
    assert sorted(norm_chart) == [f"grad_norm/{T.layer_key(i, n, 2)}" for i, n in enumerate(layers)]
    total_chart = [t for t in scalar_tags if any(re.search(rx, t) for rx in charts["total gradient norm and clipping threshold"])]
    assert total_chart == ["grad_norm/total"]
    assert {"gradient / weight norm per layer", "dead-unit fraction per activation", "saturated fraction per activation",
            "non-finite gradient values per layer", "loss"} <= set(charts)
    images = acc.Images(T.FIGURE_TAG)
    assert [e.step for e in images] == [9, 19, 20]  # every 10 collected steps, and at close
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and images[0].width > 300
    texts = acc.Tensors(T.DIAGNOSIS_TAG + "/text_summary")
    assert len(texts) >= 1 and b"healthy" in texts[0].tensor_proto.string_val[0]
    (meta,) = acc.Tensors(T.META_TAG)
    import json

    info = json.loads(meta.tensor_proto.string_val[0])
    assert [d["name"] for d in info["layers"]] == layers
    assert info["layers"][0]["type_name"] == "Linear" and info["activations"][0]["kind"] == "relu"
    assert info["thresholds"]["window"] == 50


def test_diagnosis_text_only_when_findings_change(tmp_path: Path) -> None:
    model = mlp(nn.Sigmoid, 10)
    with gradwatch.watch(model, log_dir=tmp_path, diagnose_every_n_steps=5, figure_every_n_steps=0,
                         histogram_every_n_steps=0, on_error="raise") as w:
        train(model, vector_task(), 30, watcher=w, lr=0.5)
    texts = accumulate(tmp_path).Tensors(T.DIAGNOSIS_TAG + "/text_summary")
    bodies = [t.tensor_proto.string_val[0].decode() for t in texts]
    assert len(bodies) < 6  # diagnosed 6 times (every 5 steps + close), written only on change
    assert "vanishing" in bodies[-1] and bodies[-1].startswith("**step")


def test_borrowed_writer_is_flushed_not_closed_and_layout_is_written_once(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = mlp(nn.ReLU, 3)
        with gradwatch.watch(model, log_dir=writer, figure_every_n_steps=0) as w:
            train(model, vector_task(), 3, watcher=w)
        assert writer.file_writer is not None  # still open
    writer.add_scalar("user/accuracy", 0.5, 3)  # the owner keeps using it
    writer.close()
    layouts = 0
    for f in tmp_path.glob("events.out.tfevents.*"):
        for event in LegacyEventFileLoader(str(f)).Load():
            layouts += sum(v.tag == "custom_scalars__config__" for v in event.summary.value)
    assert layouts == 1
    assert "user/accuracy" in accumulate(tmp_path).Tags()["scalars"]


def test_standalone_sink_with_prefix(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer, prefix="gw/", figure_every_n_steps=2, weight_histograms=True)
    model = mlp(nn.ReLU, 3)
    with gradwatch.watch(model, sinks=[sink], histogram_every_n_steps=2) as w:
        train(model, vector_task(), 4, watcher=w)
    writer.close()
    acc = accumulate(tmp_path)
    assert "gw/grad_norm/total" in acc.Tags()["scalars"] and "gw/grad_norm/00.0" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Images("gw/" + T.FIGURE_TAG)] == [1, 3]
    weights = acc.Histograms("gw/weight_hist/00.0")
    assert [e.step for e in weights] == [0, 2]
    assert sum(weights[0].histogram_value.bucket) == sum(p.numel() for p in model[0].parameters())


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="directory path or a torch.utils.tensorboard.SummaryWriter"):
        TensorBoardSink(42)
    with pytest.raises(ValueError, match="figure_every_n_steps"):
        TensorBoardSink(tmp_path, figure_every_n_steps=-1)
    with pytest.raises(ValueError, match="prefix"):
        TensorBoardSink(tmp_path, prefix="gw")
    with pytest.raises(ValueError, match="write_every_n_steps must be an integer >= 1"):
        TensorBoardSink(tmp_path, write_every_n_steps=0)
    with pytest.warns(DeprecationWarning, match="write_every_n_steps"):
        TensorBoardSink(tmp_path, write_every_n_steps=4).close()


def _scalar_steps(path: Path) -> list[int]:
    steps = []
    for f in sorted(path.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(f)).Load():
            if any(v.tag == "grad_norm/total" for v in event.summary.value):
                steps.append(event.step)
    return steps


def test_step_events_reach_the_writer_as_they_arrive_and_all_of_them_at_close(tmp_path: Path) -> None:
    """The sink holds no events back: each step is handed to the writer as it arrives (the writer is
    flushed here after every step, so what is on disk is what was handed over), in step order, and
    nothing is lost at close."""
    from gradwatch.collect import GRAD_METRICS
    from gradwatch.sinks import StepRecord

    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer, histograms=False, figure_every_n_steps=0)
    seen = []
    for step in range(10):
        seen.append(len(_scalar_steps(tmp_path)))
        values = np.full((2, len(GRAD_METRICS)), float(step + 1))
        sink.write_step(StepRecord(step=step, layers=["fc1", "fc2"], values=values, total_norm=float(step), loss=0.5))
        writer.flush()
    assert seen == list(range(10))  # one more on disk after every step
    assert _scalar_steps(tmp_path) == list(range(10))
    sink.close()
    assert _scalar_steps(tmp_path) == list(range(10))
    writer.close()
    assert scalar_map(accumulate(tmp_path))["grad_norm/01.fc2"] == {s: float(s + 1) for s in range(10)}


def test_the_watcher_records_common_steps_in_batches_and_loses_none(tmp_path: Path) -> None:
    """Common steps reach the history and the sinks in batches; reading the history, diagnosing and
    closing flush them, so every step is there, in order, with the values of its own step."""
    torch.manual_seed(0)
    model = mlp(nn.ReLU, 3)
    with gradwatch.watch(model, log_dir=tmp_path, figure_every_n_steps=0, histogram_every_n_steps=0,
                         activations=False) as w:
        train(model, vector_task(), 7, watcher=w)
        assert w._buffer  # steps 2.. are common ones, not yet recorded
        assert w.history.total_steps == 7 and not w._buffer  # reading the history flushes them
        train(model, vector_task(), 16, watcher=w)
        df = w.to_dataframe()
    assert sorted(df["step"].unique()) == list(range(23))
    steps = [e.step for e in accumulate(tmp_path).Scalars("grad_norm/total")]
    assert steps == list(range(23))
    norms = df[(df["metric"] == "grad_norm") & (df["layer"] == T.TOTAL_LAYER)].set_index("step")["value"]
    tb = {e.step: e.value for e in accumulate(tmp_path).Scalars("grad_norm/total")}
    assert all(tb[s] == pytest.approx(norms[s], rel=1e-6) for s in range(23))


def test_writers_other_than_tensorboards_own_get_the_same_events(tmp_path: Path) -> None:
    """A SummaryWriter whose event writer is not TensorBoard's ``EventFileWriter`` (a subclass,
    here) gets parsed events through the public ``add_event``: the same values and steps."""
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    class CountingEventFileWriter(EventFileWriter):
        added = 0

        def add_event(self, event) -> None:  # noqa: ANN001
            CountingEventFileWriter.added += 1
            super().add_event(event)

    runs = {}
    for name in ("own", "other"):
        torch.manual_seed(0)
        model = mlp(nn.ReLU, 3)
        writer = SummaryWriter(str(tmp_path / name))
        if name == "other":
            fw = writer._get_file_writer()
            fw.event_writer.close()
            fw.event_writer = CountingEventFileWriter(str(tmp_path / name))
        with gradwatch.watch(model, log_dir=writer, histogram_every_n_steps=0, figure_every_n_steps=0) as w:
            train(model, vector_task(), 6, watcher=w)
        writer.close()
        runs[name] = scalar_map(accumulate(tmp_path / name))
    assert CountingEventFileWriter.added >= 6
    assert runs["own"].keys() == runs["other"].keys() and runs["own"] == runs["other"]


def test_a_closed_or_failing_writer_never_breaks_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = SummaryWriter(str(tmp_path / "closed"))
    model = mlp(nn.ReLU, 3)
    with caplog.at_level(logging.WARNING, logger="gradwatch"), gradwatch.watch(model, log_dir=writer) as w:
        train(model, vector_task(), 2, watcher=w)
        writer.close()  # the owner closes it first (e.g. a logger torn down early)
        train(model, vector_task(), 3, watcher=w)
    assert w.error is None and w.collected == 5
    assert sum("was closed" in r.message for r in caplog.records) == 1
    assert list((tmp_path / "closed").glob("events*")) and len(list((tmp_path / "closed").glob("events*"))) == 1

    caplog.clear()
    broken = SummaryWriter(str(tmp_path / "broken"))
    queue = broken.file_writer.event_writer._async_writer  # where serialized events are handed over
    real = queue.write

    def disk_full_for_histograms(data: bytes) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        if any(v.HasField("histo") for v in Event.FromString(data).summary.value):
            raise OSError("disk full")
        return real(data)

    queue.write = disk_full_for_histograms
    model = mlp(nn.ReLU, 3)
    with caplog.at_level(logging.ERROR, logger="gradwatch"), gradwatch.watch(model, log_dir=broken, histogram_every_n_steps=1) as w:
        train(model, vector_task(), 3, watcher=w)
    assert w.error is None and w.collected == 3
    assert sum("disk full" in r.message for r in caplog.records) == 1
    broken.close()
    assert [e.step for e in accumulate(tmp_path / "broken").Scalars("grad_norm/total")] == [0, 1, 2]


@pytest.mark.parametrize("hot_path", ["host", "accelerator"])
def test_training_that_raises_inside_the_watcher_context_loses_nothing(tmp_path: Path, hot_path: str) -> None:
    model = mlp(nn.ReLU, 3)
    with pytest.raises(RuntimeError, match="boom"), gradwatch.watch(model, log_dir=tmp_path, hot_path=hot_path) as w:
        def explode(step: int) -> None:
            if step == 7:
                raise RuntimeError("boom")

        train(model, vector_task(), 10, watcher=w, before_step=explode)
    steps = [e.step for e in accumulate(tmp_path).Scalars("grad_norm/total")]
    assert steps == list(range(7))


def _python(script: str, cwd: Path) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[1]
    code = f"import sys; sys.path[:0] = [{str(root)!r}, {str(root / 'tests')!r}]\n" + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("hot_path", ["host", "accelerator"])
def test_interpreter_exit_after_an_exception_flushes_without_close(tmp_path: Path, hot_path: str) -> None:
    proc = _python(f"""
        import torch, gradwatch
        from torch import nn
        from gw_testing import mlp, train, vector_task
        model = mlp(nn.ReLU, 3)
        w = gradwatch.watch(model, log_dir="run", hot_path="{hot_path}")   # never closed; flush every 10 s
        train(model, vector_task(), 15, watcher=w)   # the last steps are still batched in the watcher
        raise SystemExit("training died")
    """, tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "training died" in err
    steps = [e.step for e in accumulate(tmp_path / "run").Scalars("grad_norm/total")]
    assert steps == list(range(15))


@pytest.mark.slow
def test_a_killed_run_leaves_readable_events_up_to_the_last_flush(tmp_path: Path) -> None:
    proc = _python("""
        import time, torch, gradwatch
        from torch import nn
        from gw_testing import mlp, vector_task
        import torch.nn.functional as F
        from gradwatch.tensorboard import TensorBoardSink
        model = mlp(nn.ReLU, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        w = gradwatch.watch(model, sinks=[TensorBoardSink("run", flush_secs=0.5)], histogram_every_n_steps=3)
        batch = vector_task()
        step = 0
        while True:
            x, y = batch(step)
            F.cross_entropy(model(x), y).backward(); w.step(); opt.step(); opt.zero_grad()
            print(step, flush=True)
            step += 1
            time.sleep(0.02)
    """, tmp_path)
    deadline = time.monotonic() + 120
    seen = -1
    while seen < 30 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen = int(line)
    time.sleep(1.5)  # at least two flush intervals after step 30
    proc.kill()
    proc.communicate(timeout=30)
    assert seen >= 30, "the training subprocess did not get going"
    acc = accumulate(tmp_path / "run")
    steps = [e.step for e in acc.Scalars("grad_norm/total")]
    assert steps[:31] == list(range(31))
    assert [e.step for e in acc.Histograms("grad_hist/00.0")][:11] == list(range(0, 31, 3))
    from gradwatch.logs import read_run

    run = read_run(tmp_path / "run")  # never a traceback, whatever the tail of the file looks like
    assert run.has_gradwatch_data and run.frame["step"].max() >= 30


def test_fast_record_checksum_is_tensorboards_checksum(tmp_path: Path) -> None:
    import os

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    from gradwatch.checksums import masked_crc32c

    for n in [*range(0, 300), 511, 512, 513, 4096, 65537]:
        data = os.urandom(n)
        assert masked_crc32c(data) == reference(data), n
    slow = SummaryWriter(str(tmp_path / "slow"))
    TensorBoardSink(slow, fast_crc=False)
    assert not getattr(slow.file_writer.event_writer._async_writer._writer, "_gradwatch_fast_crc", False)
    fast = SummaryWriter(str(tmp_path / "fast"))
    assert TensorBoardSink(fast).fast_crc
    for writer in (slow, fast):
        writer.add_histogram("h", np.arange(1000.0), 1)
        writer.close()
    # identical bytes apart from the file header (wall time): TensorBoard reads both
    assert accumulate(tmp_path / "fast").Histograms("h")[0].histogram_value == accumulate(tmp_path / "slow").Histograms("h")[0].histogram_value


def test_histogram_bytes_are_the_proto_tensorboard_would_write() -> None:
    """The hand-serialized histogram value parses to exactly the ``HistogramProto`` that
    ``add_histogram_raw`` builds from the same numbers."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    from gradwatch.tensorboard_events import histogram_value_bytes

    g = torch.randn(3000, dtype=torch.float64) * 1e-3
    g[:50] = 0.0
    (layer,) = bin_on_device([[g]])
    for h in (layer.values, layer.log10_abs):
        (value,) = Summary.FromString(histogram_value_bytes("grad_hist/00.fc", h)).value
        want = HistogramProto(min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares,
                              bucket_limit=h.bucket_limits, bucket=h.bucket_counts)
        assert value.tag == "grad_hist/00.fc" and value.histo == want
        assert sum(value.histo.bucket) == h.num > 0
    assert histogram_value_bytes("x", None) == b""


def test_a_histogram_round_is_spread_over_steps_within_the_element_budget(tmp_path: Path) -> None:
    """With ``histogram_max_elements`` below the model's size, each round bins every layer exactly
    once, in depth order, on consecutive steps, each step within the budget (one layer at least),
    and every histogram counts all elements of its layer at the step it is logged under."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 200), nn.ReLU(),
                          nn.Linear(200, 10))
    sizes = [sum(p.numel() for p in m.parameters()) for m in model if isinstance(m, nn.Linear)]
    budget = 9000  # fits layers 0 and 1 (1088 + 4160), then layer 2 (13000 > budget) alone, then layer 3
    with gradwatch.watch(model, log_dir=tmp_path, histogram_every_n_steps=6, histogram_max_elements=budget,
                         figure_every_n_steps=0, activations=False) as w:
        train(model, vector_task(), 14, watcher=w)
        keys = [T.layer_key(i, layer.name, T.depth_width(len(w.layers))) for i, layer in enumerate(w.layers)]
    acc = accumulate(tmp_path)
    logged = {key: [e.step for e in acc.Histograms(f"{T.GRAD_HIST}/{key}")] for key in keys}
    assert logged == {keys[0]: [0, 6, 12], keys[1]: [0, 6, 12], keys[2]: [1, 7, 13], keys[3]: [2, 8]}
    for key, size in zip(keys, sizes, strict=True):
        for event in acc.Histograms(f"{T.GRAD_HIST}/{key}"):
            assert event.histogram_value.num == size

    unbounded = tmp_path / "unbounded"
    with gradwatch.watch(model, log_dir=unbounded, histogram_every_n_steps=6, histogram_max_elements=None,
                         figure_every_n_steps=0, activations=False) as w:
        train(model, vector_task(), 7, watcher=w)
    acc = accumulate(unbounded)
    assert all([e.step for e in acc.Histograms(f"{T.GRAD_HIST}/{key}")] == [0, 6] for key in keys)
    with pytest.raises(ValueError, match="histogram_max_elements must be an integer >= 1"):
        gradwatch.watch(model, histogram_max_elements=0)


def test_a_histogram_round_ends_within_the_cadence_whatever_the_budget(tmp_path: Path) -> None:
    """A budget far below the model's size is raised so that rounds keep their cadence; no layer is
    ever starved of histograms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 200), nn.ReLU(),
                          nn.Linear(200, 10))
    with gradwatch.watch(model, log_dir=tmp_path, histogram_every_n_steps=4, histogram_max_elements=1,
                         figure_every_n_steps=0, activations=False) as w:
        train(model, vector_task(), 16, watcher=w)
        keys = [T.layer_key(i, layer.name, T.depth_width(len(w.layers))) for i, layer in enumerate(w.layers)]
    acc = accumulate(tmp_path)
    for key in keys:
        steps = [e.step for e in acc.Histograms(f"{T.GRAD_HIST}/{key}")]
        assert len(steps) == 4 and [s // 4 for s in steps] == [0, 1, 2, 3], (key, steps)


def test_the_accelerator_count_and_the_launched_bins_are_bincounts_and_bin_on_device() -> None:
    # the two pieces that keep a CUDA histogram step from waiting for the device, on CPU tensors: the
    # atomic count equals bincount, and bins launched then finished equal the blocking ones
    g = torch.Generator().manual_seed(5)
    keys = torch.randint(0, N_KEYS, (100_000,), generator=g, dtype=torch.int32)
    assert torch.equal(count_keys_atomically(keys), torch.bincount(keys, minlength=N_KEYS))
    groups = [[torch.randn(300, generator=g), torch.zeros(7)], [], [torch.randn(5, 5, generator=g) * 1e-30]]
    pending = launch_bins(groups)
    assert pending.ready()
    assert pending.result() == bin_on_device(groups)
