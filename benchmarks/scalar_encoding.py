"""Op-level cost of writing one collected step's per-layer scalars: hand-encoded bytes vs protobuf objects.

Times, for a model of L layers (``len(GRAD_METRICS)`` scalars per layer), the training-thread work of
turning one step's values into a serialized TensorBoard ``Event``:

- ``bytes``: gradwatch's encoder (:class:`~gradwatch.tensorboard_events.ScalarEncoder`: a cached
  byte template per NaN pattern, the packed float32 values written into its slots);
- ``proto``: ``Summary.Value`` objects per scalar, an ``Event`` around them, ``SerializeToString()``
  (what ``SummaryWriter.add_scalars``-style code does, minus its per-tag file-writer calls).

Both variants run interleaved (bytes, proto, bytes, proto, ...) over many rounds and the medians are
reported, so the load of other processes on the machine hits both alike. Example::

    python benchmarks/scalar_encoding.py --layers 100 300 500 --rounds 300
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gradwatch.collect import GRAD_METRICS  # noqa: E402
from gradwatch.tensorboard_events import ScalarEncoder, encode_scalars, event_bytes, value_prefix  # noqa: E402


def _proto_event(tags: list[str], values: np.ndarray, step: int) -> bytes:
    keep = ~np.isnan(values)
    summary = Summary(value=[Summary.Value(tag=t, simple_value=v)
                             for t, v in zip(np.asarray(tags, dtype=object)[keep].tolist(), values[keep].tolist(), strict=True)])
    return Event(wall_time=time.time(), step=step, summary=summary).SerializeToString()


def _bytes_event(encoder: ScalarEncoder, values: np.ndarray, step: int) -> bytes:
    return event_bytes(encoder.encode(values), step, time.time())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[100, 300, 500])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'layers':>6} {'scalars':>7} {'bytes us':>9} {'proto us':>9} {'saved us':>9}  (medians of {args.rounds} interleaved rounds)")
    for n in args.layers:
        tags = [f"{m}/{i:03d}.blocks.{i}.linear" for i in range(n) for m in GRAD_METRICS]
        prefixes = np.array([value_prefix(t) for t in tags], dtype=object)
        encoder = ScalarEncoder(prefixes)
        values = rng.random(len(tags))
        values[rng.random(len(tags)) < 0.3] = np.nan  # slow statistics are absent on most steps
        assert encoder.encode(values) == encode_scalars(prefixes, values)
        assert Event.FromString(_bytes_event(encoder, values, 7)).summary == Event.FromString(_proto_event(tags, values, 7)).summary
        timings: dict[str, list[float]] = {"bytes": [], "proto": []}
        for r in range(args.rounds):
            for name in ("bytes", "proto") if r % 2 else ("proto", "bytes"):
                t0 = time.perf_counter()
                if name == "bytes":
                    _bytes_event(encoder, values, r)
                else:
                    _proto_event(tags, values, r)
                timings[name].append(time.perf_counter() - t0)
        b, p = (statistics.median(timings[k]) * 1e6 for k in ("bytes", "proto"))
        print(f"{n:>6} {len(tags):>7} {b:>9.0f} {p:>9.0f} {p - b:>9.0f}")


if __name__ == "__main__":
    main()
