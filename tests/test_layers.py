"""Layer discovery and forward-order depth."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.layers import (
    ROOT_NAME,
    ForwardOrderRecorder,
    depth_order,
    discover_layers,
    observe_structure,
    unwrap_model,
)


class Reordered(nn.Module):
    """Registers `late` first but runs it last: depth must follow execution, not registration."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(4, 2)
        self.act = nn.Sigmoid()
        self.early = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(self.act(self.early(x))) * self.scale


def test_layers_are_modules_owning_parameters_named_as_named_modules() -> None:
    model = Reordered()
    names = [layer.name for layer in discover_layers(model)]
    assert names == [ROOT_NAME, "late", "early"]
    assert {n for n, _ in model.named_modules()} >= {"late", "early"}


def test_depth_follows_forward_order_and_hooks_remove_themselves() -> None:
    model = Reordered()
    rec = ForwardOrderRecorder(model)
    model(torch.randn(2, 3))
    assert rec.done
    ordered = [layer.name for layer in depth_order(discover_layers(model), rec.order)]
    assert ordered == ["early", "late", ROOT_NAME]
    assert all(not m._forward_hooks for m in model.modules())


def test_observe_structure_restores_modes_and_leaves_batchnorm_statistics_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1), nn.Sigmoid())
    model.train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = observe_structure(model, torch.randn(5, 3))
    assert s["order"][:3] == ["0", "1", "2"]
    assert s["activations"] == {"2": "1", "4": "3"}
    assert s["output_shapes"]["0"] == [5, 4]
    assert model.training and not model[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unwrap_compiled_module() -> None:
    model = nn.Linear(2, 2)
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model


def test_submodules_used_by_their_parent_directly_sit_next_to_it() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    rec = ForwardOrderRecorder(layer)
    layer(torch.randn(2, 3, 8))
    names = [x.name for x in depth_order(discover_layers(layer), rec.order)]
    assert names.index("self_attn.out_proj") == names.index("self_attn") + 1


def test_model_structure_round_trips_through_its_plain_dict_form_and_reads_old_dicts() -> None:
    import json

    from gradwatch.fixes.topology import Topology
    from gradwatch.layers import structure_from_recorder
    from gradwatch.structure import ModelStructure

    model = Reordered()
    recorder = ForwardOrderRecorder(model)
    model(torch.randn(2, 3))
    structure = structure_from_recorder(model, recorder)
    assert structure.order == ["early", "act", "late", ROOT_NAME]
    assert structure.activations == {"act": "early"} and structure.calls["late"] == 1
    plain = structure.to_dict()
    assert plain == observe_structure(model, torch.randn(2, 3))  # the form Diagnosis.structure holds
    assert ModelStructure.from_dict(json.loads(json.dumps(plain))) == structure  # logs, state dicts
    assert dict(structure) == plain and structure["order"] == plain["order"]  # read like the former dict
    old = {"order": plain["order"], "output_shapes": plain["output_shapes"]}  # an older dict: fewer keys
    restored = ModelStructure.from_dict(old)
    assert restored.order == structure.order and restored.calls == {} and restored.types == {}
    assert Topology(dict(model.named_modules()), old).order == Topology(dict(model.named_modules()), structure).order
    empty = ModelStructure.from_dict({})
    assert not empty and empty.to_dict() == {} and dict(empty) == {} and empty.get("order") is None
