"""The pieces ``GradWatcher`` wires together, each on its own: histogram rounds, layer metadata,
optimizer context, row reduction, the one-watcher-per-model registry and parameter changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch.histogram_rounds import HistogramRounds
from gradwatch.hotpath import DeviceRows
from gradwatch.layer_meta import activation_layout, layer_meta
from gradwatch.layers import discover_layers
from gradwatch.optimizer_hooks import largest_lr, optimizer_context
from gradwatch.param_changes import ParameterChanges
from gradwatch.row_reduction import RowReduction
from gradwatch.structure import ModelStructure
from gradwatch.watch_registry import claim, release


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def test_a_round_starts_on_its_cadence_and_bins_each_layer_once_within_the_budget() -> None:
    layers = discover_layers(mlp())  # 40, 72 and 18 elements
    rounds = HistogramRounds(every_n_steps=100, max_elements=80)
    assert rounds.starts_at(0, writable=True) and not rounds.starts_at(0, writable=False)
    assert not rounds.starts_at(1, writable=True) and not rounds.in_progress
    rounds.start(layers)
    assert [layer.name for layer in rounds.next_layers(layers)] == ["0"]  # 40 + 72 > 80
    rounds.start(layers)  # an unfinished round is finished first
    assert [layer.name for layer in rounds.next_layers(layers)] == ["2"]  # 72 + 18 > 80
    assert [layer.name for layer in rounds.next_layers(layers)] == ["4"]
    assert not rounds.in_progress


def test_a_round_ends_within_its_cadence_and_skips_layers_that_left() -> None:
    layers = discover_layers(mlp())
    rounds = HistogramRounds(every_n_steps=2, max_elements=1)  # raised to 2 * 130 / 2 = 130 elements a step
    rounds.start(layers)
    assert [layer.name for layer in rounds.next_layers(layers)] == ["0", "2", "4"]
    rounds = HistogramRounds(every_n_steps=2, max_elements=None)
    rounds.start(layers)
    assert [layer.name for layer in rounds.next_layers(layers[1:])] == ["2", "4"]
    assert HistogramRounds(every_n_steps=0, max_elements=None).starts_at(0, writable=True) is False


def test_layer_and_activation_metadata_follow_the_forward_order() -> None:
    model = mlp()
    layers = discover_layers(model)
    assert [(m.type_name, m.depth, m.fan_in) for m in layer_meta(layers)] == [("Linear", 0, 4), ("Linear", 1, 8),
                                                                              ("Linear", 2, 8)]
    structure = ModelStructure(order=["0", "1", "2", "3", "4"], types={"0": "Linear", "2": "Linear", "4": "Linear"},
                               activations={"1": "0", "3": "2"})
    acts = activation_layout(model, layers, structure.order, structure)
    assert acts.names == ["1", "3"] and acts.channel_first == set()
    assert [(m.kind, m.feeding_layer, m.is_output) for m in acts.meta] == [("relu", "0", False), ("tanh", "2", False)]


def test_optimizer_context_names_the_optimizers_and_their_scale_invariance() -> None:
    params = list(mlp().parameters())
    adam, sgd = torch.optim.Adam(params, lr=1e-3), torch.optim.SGD(params, lr=0.1)
    assert optimizer_context(adam) == {"optimizer": "Adam", "optimizer_scale_invariant": True}
    assert optimizer_context(adam, sgd) == {"optimizer": "Adam, SGD", "optimizer_scale_invariant": False}
    assert optimizer_context() == {"optimizer": None, "optimizer_scale_invariant": None}
    assert largest_lr(sgd) == 0.1 and largest_lr(None) is None


class Collective:
    """A reducer with ``abstain()``, as the distributed integrations pass (counts its calls)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.calls.append("reduce")
        return rows * 2

    def abstain(self) -> None:
        self.calls.append("abstain")


def test_a_stopped_watcher_takes_part_in_every_later_reduction() -> None:
    reduction = RowReduction()
    reduction.note_failure()  # no collective: nothing to take part in
    assert not reduction.abstaining
    collective = reduction.reducer = Collective()
    reduction.begin_step()
    reduction.note_failure()  # failed before reducing: takes part at this step already
    assert collective.calls == ["abstain"] and reduction.abstaining
    reduction = RowReduction()
    collective = reduction.reducer = Collective()
    reduction.begin_step()
    reduction.reduce([DeviceRows(torch.device("cpu"), torch.zeros(8, 2), [0, 1])])
    reduction.note_failure()  # failed (or learned a peer did) after reducing: from the next step on
    assert reduction.abstaining and collective.calls == ["reduce"]
    for _ in range(3):  # ... at every one: the others may learn of it only steps later
        reduction.begin_step()
        reduction.abstain()
    assert collective.calls == ["reduce", "abstain", "abstain", "abstain"] and reduction.abstaining


def test_a_rank_without_gradients_still_joins_the_collective() -> None:
    class Joining(Collective):
        def join_empty(self) -> None:
            self.calls.append("join_empty")

    reduction = RowReduction()
    collective = reduction.reducer = Joining()
    reduction.begin_step()
    assert reduction.reduce([]) == []
    assert collective.calls == ["join_empty"]
    reduction.note_failure()  # it took part at this step: abstaining from the next one
    assert collective.calls == ["join_empty"] and reduction.abstaining
    plain = RowReduction()
    plain.reducer = lambda rows: rows  # not a collective: nothing to join
    assert plain.reduce([]) == []


def test_a_broken_collective_ends_the_abstaining() -> None:
    class Broken(Collective):
        def abstain(self) -> None:
            raise RuntimeError("process group destroyed")

    reduction = RowReduction()
    reduction.reducer = Broken()
    reduction.begin_step()
    reduction.note_failure()
    assert not reduction.abstaining


def test_one_open_watcher_per_model() -> None:
    class Watcher:
        def __init__(self, name: str) -> None:
            self.name, self.closed = name, False

    model, first, second = mlp(), Watcher("first"), Watcher("second")
    claim(model, first)
    with pytest.raises(RuntimeError, match="already watched by another GradWatcher \\('first'\\)"):
        claim(model, second)
    release(model, second)  # not its watcher: nothing happens
    with pytest.raises(RuntimeError):
        claim(model, second)
    release(model, first)
    claim(model, second)


def test_replaced_parameters_are_noticed() -> None:
    model = mlp()
    changes = ParameterChanges(model)
    changes.remember(discover_layers(model))
    assert not changes.changed()
    model[2] = nn.Linear(8, 8)
    assert changes.changed()
    changes.remember(discover_layers(model))
    assert not changes.changed()
