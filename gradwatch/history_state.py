"""Checkpointing the history: everything it keeps as plain data, and loading it back by name.

:class:`HistoryCheckpoint` is a base of :class:`gradwatch.history.History` (it reads and replaces
the history's buffers), kept apart so the store itself stays about recording and reading.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from gradwatch.history_buffers import BlockSummary, RingBuffer
from gradwatch.history_view import ActivationMeta, LayerMeta
from gradwatch.metrics import ACT_METRICS, GRAD_METRICS, LAYER_SIGNAL_METRICS

_STATE_VERSION = 1


class HistoryCheckpoint:
    """``state_dict`` / ``load_state_dict`` of a :class:`gradwatch.history.History`."""

    # the history's state these methods read and replace (set by ``History.__init__``)
    layers: list[str]
    layer_meta: dict[str, LayerMeta]
    activations: list[str]
    activation_meta: dict[str, ActivationMeta]
    _grad: RingBuffer
    _scalars: RingBuffer
    _act: RingBuffer
    _signal: RingBuffer
    _summary: BlockSummary
    first_nonfinite: tuple[int, list[str]] | None
    nonfinite_provenance: dict[str, Any] | None
    loss_scales: deque[tuple[int, float]]
    nonfinite_steps: int
    total_steps: int
    context: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        """Everything kept (recent window, samples, long-term summary, counters) as plain data.

        Arrays are ``torch.Tensor`` (float32 values, int64 steps) and everything else is built-in
        Python types, so the result fits in a checkpoint and loads with ``torch.load(weights_only=True)``.
        Only the records actually held are stored, oldest first.
        """
        import torch

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a).copy())

        steps, grad = self._grad.ordered()
        _, scalars = self._scalars.ordered()
        s_steps, act = self._act.ordered()
        _, signal = self._signal.ordered()
        sm = self._summary
        n = sm.filled
        return {
            "version": _STATE_VERSION,
            "capacity": self._grad.capacity,
            "sample_capacity": self._act.capacity,
            "layers": list(self.layers),
            "layer_meta": {name: asdict(self.layer_meta[name]) for name in self.layers},
            "activations": list(self.activations),
            "activation_meta": {name: asdict(self.activation_meta[name]) for name in self.activations},
            "steps": tensor(steps),
            "grad": tensor(grad),
            "scalars": tensor(scalars),
            "sample_steps": tensor(s_steps),
            "act": tensor(act),
            "signal": tensor(signal),
            "summary": {
                "slots": sm.slots, "block": sm.block, "in_block": sm._in_block,
                "sums": tensor(sm.sums[:n]), "counts": tensor(sm.counts[:n]),
                "first": tensor(sm.first[:n]), "last": tensor(sm.last[:n]),
            },
            "first_nonfinite": None if self.first_nonfinite is None else [self.first_nonfinite[0], list(self.first_nonfinite[1])],
            "nonfinite_provenance": self.nonfinite_provenance,
            "loss_scales": [list(x) for x in self.loss_scales],
            "nonfinite_steps": self.nonfinite_steps,
            "total_steps": self.total_steps,
            "context": dict(self.context),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the recorded data with ``state`` (from :meth:`state_dict`), keeping this history's columns.

        Layers and activations are matched **by name**: those already registered here keep their
        column and their (current) metadata, names only in ``state`` are appended, so a watcher that
        registered its layers before loading keeps working. Records beyond this history's capacity
        are dropped oldest first. Keys missing from older states fall back to empty defaults.

        Raises:
            ValueError: ``state`` comes from a newer, unknown format version.
        """
        version = int(state.get("version", 1))
        if version > _STATE_VERSION:
            raise ValueError(f"History state version {version} is newer than supported ({_STATE_VERSION})")
        names = [str(n) for n in state.get("layers", [])]
        metas = state.get("layer_meta", {})
        new = [n for n in names if n not in self.layer_meta]
        if new:
            self.register_layers(new, [_meta(LayerMeta, metas.get(n)) for n in new])
        anames = [str(n) for n in state.get("activations", [])]
        ametas = state.get("activation_meta", {})
        new_a = [n for n in anames if n not in self.activation_meta]
        if new_a:
            self.register_activations(new_a, [_meta(ActivationMeta, ametas.get(n)) for n in new_a])
        col = {n: i for i, n in enumerate(self.layers)}
        acol = {n: i for i, n in enumerate(self.activations)}
        lmap = np.array([col[n] for n in names], dtype=np.int64)
        amap = np.array([acol[n] for n in anames], dtype=np.int64)

        def array(key: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
            value = state.get(key)
            if value is None:
                return np.zeros(tuple(max(0, d) for d in shape), dtype=dtype)
            return np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=dtype).reshape(shape)

        steps = array("steps", (-1,), np.int64)
        t = len(steps)
        grad = array("grad", (t, len(names), len(GRAD_METRICS)))
        scalars = array("scalars", (t, 2))
        s_steps = array("sample_steps", (-1,), np.int64)
        s = len(s_steps)
        act = array("act", (s, len(anames), len(ACT_METRICS)))
        signal = array("signal", (s, len(names), len(LAYER_SIGNAL_METRICS)))
        n_l, n_a = len(self.layers), len(self.activations)
        self._grad = RingBuffer(self._grad.capacity, (n_l, len(GRAD_METRICS)))
        self._scalars = RingBuffer(self._scalars.capacity, (2,))
        self._act = RingBuffer(self._act.capacity, (n_a, len(ACT_METRICS)))
        self._signal = RingBuffer(self._signal.capacity, (n_l, len(LAYER_SIGNAL_METRICS)))
        for i in range(t):
            record = np.full((n_l, len(GRAD_METRICS)), np.nan, dtype=np.float32)
            record[lmap] = grad[i]
            self._grad.append(int(steps[i]), record)
            self._scalars.append(int(steps[i]), scalars[i])
        for i in range(s):
            a = np.full((n_a, len(ACT_METRICS)), np.nan, dtype=np.float32)
            a[amap] = act[i]
            sig = np.full((n_l, len(LAYER_SIGNAL_METRICS)), np.nan, dtype=np.float32)
            sig[lmap] = signal[i]
            self._act.append(int(s_steps[i]), a)
            self._signal.append(int(s_steps[i]), sig)
        summary = state.get("summary") or {}
        sm = BlockSummary(int(summary.get("slots", self._summary.slots)), (n_l, len(GRAD_METRICS)))
        first = np.asarray(summary.get("first", np.zeros(0)), dtype=np.int64).reshape(-1)
        filled = min(len(first), sm.slots)
        if filled:
            shape = (len(first), len(names), len(GRAD_METRICS))
            sums = np.asarray(summary["sums"], dtype=np.float64).reshape(shape)
            counts = np.asarray(summary["counts"], dtype=np.float64).reshape(shape)
            sm.sums[:filled][:, lmap] = sums[:filled]
            sm.counts[:filled][:, lmap] = counts[:filled]
            sm.first[:filled] = first[:filled]
            sm.last[:filled] = np.asarray(summary["last"], dtype=np.int64).reshape(-1)[:filled]
            sm.filled = filled
            sm.block = int(summary.get("block", 1))
            sm._in_block = int(summary.get("in_block", 0))
        self._summary = sm
        fnf = state.get("first_nonfinite")
        self.first_nonfinite = None if fnf is None else (int(fnf[0]), [str(n) for n in fnf[1]])
        self.nonfinite_provenance = state.get("nonfinite_provenance")
        self.loss_scales.clear()
        self.loss_scales.extend((int(t), float(s)) for t, s in state.get("loss_scales", []))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.total_steps = int(state.get("total_steps", t))
        context = dict(state.get("context", {}))
        context.update(self.context)  # what the current run set up wins over the saved context
        self.context = context


def _meta(cls: type, data: dict[str, Any] | None) -> Any:
    """Build a metadata dataclass from a saved dict, ignoring keys this version does not know."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (data or {}).items() if k in known})
