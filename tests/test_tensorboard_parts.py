"""The pieces ``TensorBoardSink`` wires together, each on its own: step scalars, run metadata and the
writer's guard against a closed writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from gradwatch import tags as T
from gradwatch.metrics import GRAD_METRICS
from gradwatch.sinks import StepRecord
from gradwatch.tensorboard_events import ScalarEncoder, encode_scalars, event_bytes, value_prefix
from gradwatch.tensorboard_meta import META_FORMAT, meta_value, run_meta
from gradwatch.tensorboard_scalars import ScalarTags
from gradwatch.tensorboard_writer import EventWriter


def test_the_scalar_encoder_writes_encode_scalars_bytes_for_every_nan_pattern() -> None:
    # templates per NaN pattern, reused and evicted: always the same bytes as the per-scalar join
    rng = np.random.default_rng(3)
    prefixes = [value_prefix(f"grad_norm/{i:03d}.layer{'x' * int(rng.integers(0, 200))}") for i in range(300)]
    encoder = ScalarEncoder(prefixes, max_layouts=3)
    masks = [rng.random(300) < q for q in (0.0, 0.3, 0.7, 1.0)]
    for k in range(40):
        values = rng.standard_normal(300) * 10.0 ** rng.integers(-30, 30, 300)
        values[masks[k % 4 if k < 20 else int(rng.integers(0, 4))]] = np.nan
        assert encoder.encode(values) == encode_scalars(np.array(prefixes, dtype=object), values)
    assert len(encoder._layouts) == 3
    assert ScalarEncoder([]).encode(np.zeros(0)) == b""


def test_a_step_encodes_to_the_summary_protobuf_would_write_skipping_nan() -> None:
    tags = ScalarTags("gw/")
    layers = ["fc1", "fc2"]
    assert tags.empty and tags.update(layers, []) and not tags.update(layers, [])
    assert not tags.update(list(layers), [])  # equal lists: same tables
    values = np.arange(2 * len(GRAD_METRICS), dtype=np.float64).reshape(2, -1)
    values[1, 0] = math.nan
    record = StepRecord(step=7, layers=layers, values=values, total_norm=3.5, extra={"clip_threshold": 1.0})
    event = Event.FromString(event_bytes(tags.encode(record), 7, 123.0))
    got = {v.tag: v.simple_value for v in event.summary.value}
    assert event.step == 7 and event.wall_time == 123.0
    assert got[f"gw/{GRAD_METRICS[0]}/{tags.layer_keys['fc1']}"] == 0.0
    assert f"gw/{GRAD_METRICS[0]}/{tags.layer_keys['fc2']}" not in got
    assert got[T.total_tag("grad_norm", "gw/")] == 3.5 and got[T.total_tag("clip_threshold", "gw/")] == 1.0
    assert T.total_tag("loss", "gw/") not in got  # NaN loss: not measured
    assert len(got) == 2 * len(GRAD_METRICS) - 1 + 2


def test_run_metadata_records_layers_with_their_keys() -> None:
    meta, context = run_meta(None, "", ["fc"], {"fc": "0.fc"}, ["act"], ["0.act"])
    assert context is None and meta["format"] == META_FORMAT
    assert meta["layers"] == [{"name": "fc", "key": "0.fc", "depth": 0}]
    value = meta_value("p/", meta)
    assert value.tag == "p/" + T.META_TAG and json.loads(value.tensor.string_val[0]) == meta


def test_a_closed_borrowed_writer_is_never_reopened(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    out = EventWriter(writer, flush_secs=1.0, fast_crc=False)
    assert not out.owns_writer
    writer.close()
    assert out.writable("scalars") is None
    assert not out.add_summary([Summary.Value(tag="x", simple_value=1.0)], 0)
    out.close()  # borrowed: left to its owner
    assert len(list(tmp_path.iterdir())) == 1  # no second event file
