"""``ModelStructure``: what one observed forward pass showed of a model, as typed plain data.

Recorded by the watcher on the first forward pass (or by :func:`gradwatch.layers.observe_structure`)
and read by depth ordering, activation metadata and the fixes (:class:`gradwatch.fixes.topology.Topology`).
It travels as a plain dict (``Diagnosis.structure``, the Lightning callback's state dict, logs):
:meth:`ModelStructure.to_dict` writes that form and :meth:`ModelStructure.from_dict` reads it back,
old dicts with missing keys included.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class ModelStructure(Mapping[str, Any]):
    """One observed forward pass. Empty (falsy) when no forward pass was observed.

    Read-only mapping access (``structure["order"]``, ``dict(structure)``) gives the plain-dict form
    that code written against the earlier untyped ``structure`` dict expects.

    Attributes:
        order: module names in execution order (the root as ``"(root)"``).
        input_shapes: ``{module name: shape of its first tensor input}``.
        output_shapes: ``{module name: shape of its first tensor output}``.
        types: ``{module name: class name}`` for every module of the model.
        activations: ``{activation module name: the parameter layer that ran just before it}``.
        calls: ``{module name: times it ran in the pass}`` (a module run more than once is shared).
    """

    order: list[str] = field(default_factory=list)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    output_shapes: dict[str, list[int]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    activations: dict[str, str | None] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The plain-dict form (JSON- and ``torch.save``-safe), as ``Diagnosis.structure`` holds it;
        ``{}`` when nothing was observed."""
        if not self:
            return {}
        return {
            "order": list(self.order),
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "output_shapes": {k: list(v) for k, v in self.output_shapes.items()},
            "types": dict(self.types),
            "activations": dict(self.activations),
            "calls": dict(self.calls),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ModelStructure:
        """Read the plain-dict form (or a ``ModelStructure``); missing keys are empty, unknown keys ignored."""
        if isinstance(data, ModelStructure):
            return data
        data = data or {}
        return cls(
            order=list(data.get("order") or []),
            input_shapes={k: list(v) for k, v in (data.get("input_shapes") or {}).items()},
            output_shapes={k: list(v) for k, v in (data.get("output_shapes") or {}).items()},
            types=dict(data.get("types") or {}),
            activations=dict(data.get("activations") or {}),
            calls={k: int(v) for k, v in (data.get("calls") or {}).items()},
        )

    # -- read-only mapping view (the plain-dict form) ----------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in _KEYS or not self:  # as the plain-dict form: {} when nothing was observed
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_KEYS if self else ())

    def __len__(self) -> int:
        return len(_KEYS) if self else 0

    def __bool__(self) -> bool:
        return bool(self.order)


_KEYS = tuple(f.name for f in fields(ModelStructure))

__all__ = ["ModelStructure"]
