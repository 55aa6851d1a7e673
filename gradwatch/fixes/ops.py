"""Structural operations as plain data: validated, applied (with undo) and spelled as code.

A structural fix is a list of *ops*, each a JSON-able dict. The same dict is applied to the
live model by the fix, re-applied to a fresh instance by :func:`gradwatch.fixes.replay`, and
rendered as copy-pasteable Python. Only the ops below exist, and only the module classes in
the tables below can be constructed from a fix report: a report cannot make gradwatch build
arbitrary classes.

Ops:
    ``replace_activation``: ``{"path", "new", "kwargs", "expect"}`` - put a fresh activation module
        (``"ReLU"``, ``"LeakyReLU"``...) where ``path`` is.
    ``wrap_norm``: ``{"path", "norm", "num_features", "eps", "momentum", "expect"}`` - replace
        ``path`` by ``nn.Sequential(original, norm)``; the original moves to ``path + ".0"``.
    ``wrap_residual``: ``{"path", "span", "alpha_init", "expect"}`` - replace the first module of
        ``span`` (consecutive children of one ``nn.Sequential``) by
        ``Residual(nn.Sequential(*span))`` and the others by ``nn.Identity()``, so later siblings
        keep their names.
    ``swap_rnn``: ``{"path", "to", "config", "gate_bias", "expect"}`` - replace an ``nn.RNN`` by
        ``nn.GRU`` or :class:`~gradwatch.fixes.modules.LSTMAsRNN` with the same sizes and flags, the
        gate that keeps the state biased by ``gate_bias`` (``None``: PyTorch's init).

``expect`` names the class found at ``path`` (a list for ``wrap_residual``) when the op was first
applied; replay refuses a model where something else is there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch.fixes import paths
from gradwatch.fixes.modules import ChannelLastBatchNorm, LSTMAsRNN, Residual, keep_gate_bias_

#: Activation classes a fix report may construct.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "ReLU": nn.ReLU,
    "LeakyReLU": nn.LeakyReLU,
    "GELU": nn.GELU,
    "SiLU": nn.SiLU,
    "ELU": nn.ELU,
}
#: Normalisation classes a fix report may construct.
NORMS: dict[str, type[nn.Module]] = {
    "BatchNorm1d": nn.BatchNorm1d,
    "BatchNorm2d": nn.BatchNorm2d,
    "BatchNorm3d": nn.BatchNorm3d,
    "ChannelLastBatchNorm": ChannelLastBatchNorm,
}
RNN_TARGETS: tuple[str, ...] = ("gru", "lstm")
RNN_CONFIG_KEYS: tuple[str, ...] = (
    "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
)

_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "replace_activation": {"path": str, "new": str, "kwargs": dict},
    "wrap_norm": {"path": str, "norm": str, "num_features": int, "eps": float | int, "momentum": float | int | None},
    "wrap_residual": {"path": str, "span": list, "alpha_init": float | int},
    "swap_rnn": {"path": str, "to": str, "config": dict, "gate_bias": float | int | None},
}
OP_NAMES: tuple[str, ...] = tuple(_REQUIRED)


class FixReportError(ValueError):
    """A fix report (or one of its ops) that is malformed or does not fit the model it is applied to."""


#: Deprecated name of :class:`FixReportError`.
RecordError = FixReportError


@dataclass
class Undo:
    """Replacements made so far, revertible in reverse order (all-or-nothing application)."""

    steps: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

    def set(self, model: nn.Module, path: str, new: nn.Module) -> nn.Module:
        parent_name, key = paths.parent_path(path)
        parent = paths.get_module(model, parent_name)
        old = parent._modules[key]
        parent.register_module(key, new)
        self.steps.append((parent, key, old))  # type: ignore[arg-type]
        return old  # type: ignore[return-value]

    def revert(self) -> None:
        for parent, key, old in reversed(self.steps):
            parent.register_module(key, old)
        self.steps.clear()


def validate(op: Any) -> None:
    """Check an op's shape (keys, types, allowed names) without looking at any model.

    Raises:
        FixReportError: naming the bad key or value and what is allowed.
    """
    if not isinstance(op, dict):
        raise FixReportError(f"an op must be a dict, got {type(op).__name__}")
    name = op.get("op")
    if not isinstance(name, str) or name not in _REQUIRED:
        raise FixReportError(f"unknown op {name!r}; allowed: {OP_NAMES}")
    for key, types in _REQUIRED[name].items():
        if key not in op:
            raise FixReportError(f"op {name!r} lacks {key!r}")
        value = op[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise FixReportError(f"op {name!r}: {key}={value!r} has type {type(value).__name__}")
    if not op["path"] or op["path"] == "(root)":
        raise FixReportError(f"op {name!r}: path {op['path']!r} must name a submodule, not the model")
    if name == "replace_activation" and op["new"] not in ACTIVATIONS:
        raise FixReportError(f"replace_activation: new={op['new']!r}; allowed: {tuple(ACTIVATIONS)}")
    if name == "replace_activation":
        for key, value in op["kwargs"].items():
            if not isinstance(key, str) or not (value is None or isinstance(value, bool | str) or _finite(value)):
                raise FixReportError(f"replace_activation: kwargs {key!r}={value!r} must be a finite number, bool or string")
    if name == "wrap_norm":
        if op["norm"] not in NORMS:
            raise FixReportError(f"wrap_norm: norm={op['norm']!r}; allowed: {tuple(NORMS)}")
        _check_number(name, "num_features", op["num_features"], low=1, integer=True)
        _check_number(name, "eps", op["eps"], low=0, open_low=True)
        if op["momentum"] is not None:
            _check_number(name, "momentum", op["momentum"], low=0, high=1)
    if name == "wrap_residual":
        _check_number(name, "alpha_init", op["alpha_init"])
    if name == "wrap_residual":
        span = op["span"]
        if not span or not all(isinstance(p, str) and p for p in span) or span[0] != op["path"]:
            raise FixReportError(f"wrap_residual: span={span!r} must list module paths starting with path={op['path']!r}")
    if name == "swap_rnn":
        if op["to"] not in RNN_TARGETS:
            raise FixReportError(f"swap_rnn: to={op['to']!r}; allowed: {RNN_TARGETS}")
        missing = [k for k in RNN_CONFIG_KEYS if k not in op["config"]]
        extra = [k for k in op["config"] if k not in RNN_CONFIG_KEYS]
        if missing or extra:
            raise FixReportError(f"swap_rnn: config keys missing {missing}, unknown {extra}; expected {RNN_CONFIG_KEYS}")
        config = op["config"]
        for key in ("input_size", "hidden_size", "num_layers"):
            _check_number(name, f"config.{key}", config[key], low=1, integer=True)
        for key in ("bias", "batch_first", "bidirectional"):
            if not isinstance(config[key], bool):
                raise FixReportError(f"swap_rnn: config.{key}={config[key]!r} must be true or false")
        _check_number(name, "config.dropout", config["dropout"], low=0, high=1)
        if op["gate_bias"] is not None:
            _check_number(name, "gate_bias", op["gate_bias"])


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(op: str, key: str, value: Any, low: float | None = None, high: float | None = None,
                  integer: bool = False, open_low: bool = False) -> None:
    """An op's number must be finite (JSON allows NaN and Infinity), of the right kind and in range."""
    if not _finite(value) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a finite number"
        raise FixReportError(f"{op}: {key}={value!r} must be {kind}")
    if low is not None and (value < low or (open_low and value == low)):
        raise FixReportError(f"{op}: {key}={value!r} must be {'>' if open_low else '>='} {low}")
    if high is not None and value > high:
        raise FixReportError(f"{op}: {key}={value!r} must be <= {high}")


def renames_of(op: dict[str, Any]) -> dict[str, str]:
    """Where existing modules move when ``op`` is applied: ``{old path: new path}`` (pure)."""
    if op["op"] == "wrap_norm":
        return {op["path"]: f"{op['path']}.0"}
    if op["op"] == "wrap_residual":
        span = op["span"]
        if len(span) == 1:
            return {op["path"]: f"{op['path']}.block"}
        return {p: f"{op['path']}.block.{i}" for i, p in enumerate(span)}
    return {}


def _check_expect(op: dict[str, Any], found: str | list[str]) -> None:
    expect = op.get("expect")
    if expect is not None and expect != found:
        raise FixReportError(f"op {op['op']!r} at {op['path']!r} expects {expect!r} there, found {found!r}")


def _factory(module: nn.Module) -> dict[str, Any]:
    ref = next(module.parameters(), None)
    return {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}


def apply(model: nn.Module, op: dict[str, Any], undo: Undo) -> dict[str, Any]:
    """Apply one validated op to ``model``; record ``expect`` if it was not set.

    Returns:
        ``{"new": module put at path, "renames": {old path: new path}}``.

    Raises:
        FixReportError: the model does not have the expected module at the op's path.
    """
    name = op["op"]
    path = op["path"]
    try:
        target = paths.get_module(model, path)
    except LookupError as err:
        raise FixReportError(str(err)) from None
    if name == "replace_activation":
        _check_expect(op, type(target).__name__)
        new = ACTIVATIONS[op["new"]](**op["kwargs"])
        try:  # arguments the constructor stores without checking fail on first use: use it once here
            new(torch.zeros(2))
        except Exception as err:
            raise FixReportError(f"replace_activation: {op['new']}(**{op['kwargs']!r}) does not work: {err}") from None
    elif name == "wrap_norm":
        _check_expect(op, type(target).__name__)
        features = getattr(target, "out_features", None) or getattr(target, "out_channels", None)
        if isinstance(features, int) and op["num_features"] != features:
            raise FixReportError(f"wrap_norm at {path!r}: num_features={op['num_features']} but the "
                              f"{type(target).__name__} there has {features} output features")
        norm_cls = NORMS[op["norm"]]
        norm = norm_cls(op["num_features"], eps=op["eps"], momentum=op["momentum"], **_factory(target))
        new = nn.Sequential(target, norm)
    elif name == "wrap_residual":
        span = op["span"]
        parent_name, first_key = paths.parent_path(path)
        parent = paths.get_module(model, parent_name)
        if len(span) > 1 and not isinstance(parent, nn.Sequential):
            raise FixReportError(f"wrap_residual: the parent of {path!r} is {type(parent).__name__}, not nn.Sequential")
        keys = list(parent._modules)
        try:
            modules = [paths.get_module(model, p) for p in span]
        except LookupError as err:
            raise FixReportError(str(err)) from None
        span_keys = [paths.parent_path(p)[1] for p in span]
        start = keys.index(first_key)
        if any(paths.parent_path(p)[0] != parent_name for p in span) or keys[start : start + len(span)] != span_keys:
            raise FixReportError(f"wrap_residual: span {span} is not a run of consecutive children of {parent_name!r}")
        _check_expect(op, [type(m).__name__ for m in modules])
        block = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
        new = Residual(block, alpha_init=float(op["alpha_init"]))
        for p in span[1:]:
            undo.set(model, p, nn.Identity())
    elif name == "swap_rnn":
        _check_expect(op, type(target).__name__)
        config = dict(op["config"])
        differs = {k: (v, getattr(target, k)) for k, v in config.items() if hasattr(target, k) and getattr(target, k) != v}
        if differs:  # the swap keeps the recurrence's sizes and flags
            raise FixReportError(f"swap_rnn at {path!r}: config differs from the {type(target).__name__} there "
                              f"(report, model): {differs}")
        if op["to"] == "gru":
            new = nn.GRU(**config, **_factory(target))
            if op["gate_bias"] is not None and new.bias:
                keep_gate_bias_(new, op["gate_bias"])
        else:
            new = LSTMAsRNN(**config, forget_bias=op["gate_bias"], **_factory(target))
    else:  # pragma: no cover - validate() rejects unknown ops first
        raise FixReportError(f"unknown op {name!r}")
    if op.get("expect") is None:
        op["expect"] = [type(m).__name__ for m in modules] if name == "wrap_residual" else type(target).__name__
    undo.set(model, path, new)
    return {"new": new, "renames": renames_of(op)}


def apply_all(model: nn.Module, ops: list[dict[str, Any]], on_applied: Callable[[dict, dict], None] | None = None) -> None:
    """Validate every op, then apply them in order; on any failure undo all and re-raise."""
    for op in ops:
        validate(op)
    undo = Undo()
    try:
        for op in ops:
            result = apply(model, op, undo)
            if on_applied is not None:
                on_applied(op, result)
    except Exception:
        undo.revert()
        raise


def _kwargs_code(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def code(op: dict[str, Any], model: nn.Module | None = None) -> list[str]:
    """Python statements doing what ``op`` does, on a variable named ``model``."""
    name, path = op["op"], op["path"]
    if name == "replace_activation":
        return [paths.assign(path, f"nn.{op['new']}({_kwargs_code(op['kwargs'])})", model)]
    if name == "wrap_norm":
        cls = op["norm"] if op["norm"] == "ChannelLastBatchNorm" else f"nn.{op['norm']}"
        extra = ""
        if op["eps"] != 1e-5:
            extra += f", eps={op['eps']!r}"
        if op["momentum"] != 0.1:
            extra += f", momentum={op['momentum']!r}"
        value = f"nn.Sequential({paths.expr(path, model)}, {cls}({op['num_features']}{extra}))"
        return [paths.assign(path, value, model)]
    if name == "wrap_residual":
        span = op["span"]
        inner = paths.expr(span[0], model) if len(span) == 1 else (
            "nn.Sequential(" + ", ".join(paths.expr(p, model) for p in span) + ")"
        )
        lines = [paths.assign(path, f"Residual({inner}, alpha_init={float(op['alpha_init'])!r})", model)]
        lines += [paths.assign(p, "nn.Identity()", model) for p in span[1:]]
        return lines
    if name == "swap_rnn":
        c = op["config"]
        args = f"{c['input_size']}, {c['hidden_size']}, num_layers={c['num_layers']}, bias={c['bias']}, " \
               f"batch_first={c['batch_first']}, dropout={c['dropout']}, bidirectional={c['bidirectional']}"
        if op["to"] == "gru":
            lines = [paths.assign(path, f"nn.GRU({args})", model)]
            if op["gate_bias"] is not None and c["bias"]:
                lines.append(f"keep_gate_bias_({paths.expr(path, model)}, {op['gate_bias']!r})")
            return lines
        return [paths.assign(path, f"LSTMAsRNN({args}, forget_bias={op['gate_bias']!r})", model)]
    raise FixReportError(f"unknown op {name!r}")  # pragma: no cover


def imports(op: dict[str, Any]) -> list[str]:
    """Import lines the code of ``op`` needs."""
    out = ["from torch import nn"]
    if op["op"] == "wrap_residual":
        out.append("from gradwatch.fixes import Residual")
    if op["op"] == "wrap_norm" and op["norm"] == "ChannelLastBatchNorm":
        out.append("from gradwatch.fixes import ChannelLastBatchNorm")
    if op["op"] == "swap_rnn" and op["to"] == "lstm":
        out.append("from gradwatch.fixes import LSTMAsRNN")
    if op["op"] == "swap_rnn" and op["to"] == "gru" and op["gate_bias"] is not None and op["config"]["bias"]:
        out.append("from gradwatch.fixes import keep_gate_bias_")
    return out
