"""The custom-scalars layout leaves out charts that would stay empty (no activation modules to hook)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from gw_testing import mlp, train, vector_task
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

import gradwatch
from gradwatch import tags as T


class FunctionalMLP(nn.Module):
    """Activations as functions (``F.gelu``), like most transformer code: nothing for forward hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def chart_titles(run_dir: Path) -> list[str]:
    for f in sorted(run_dir.glob("events.out.tfevents*")):
        for event in LegacyEventFileLoader(str(f)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    config = layout_pb2.Layout.FromString(value.tensor.string_val[0])
                    return [chart.title for category in config.category for chart in category.chart]
    raise AssertionError(f"no custom-scalars layout in {run_dir}")


def test_functional_activations_get_no_empty_activation_charts(tmp_path: Path) -> None:
    for name, model in (("functional", FunctionalMLP()), ("modules", mlp(nn.ReLU, 3))):
        with gradwatch.watch(model, log_dir=tmp_path / name, figure_every_n_steps=0, histogram_every_n_steps=0) as w:
            train(model, vector_task(), 3, watcher=w)
    functional, modules = chart_titles(tmp_path / "functional"), chart_titles(tmp_path / "modules")
    activation_charts = {"dead-unit fraction per activation", "saturated fraction per activation"}
    assert activation_charts <= set(modules)
    assert not activation_charts & set(functional)
    assert [t for t in modules if t not in activation_charts] == functional
    assert list(T.layout()[T.LAYOUT_CATEGORY]) == modules  # the default keeps every chart
