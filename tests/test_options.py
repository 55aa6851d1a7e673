"""``WatchOptions``: every option of ``gradwatch.watch`` validated once, with the same messages everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.options import WatchOptions, auto_fix_names, check_count, check_names
from gradwatch.thresholds import Thresholds


def test_defaults_are_the_watchers_and_every_option_has_a_field() -> None:
    import inspect

    options = WatchOptions()
    params = inspect.signature(gradwatch.GradWatcher.__init__).parameters
    assert list(WatchOptions.names()) == [n for n in params if n not in ("self", "model")]
    for name in WatchOptions.names():
        default = params[name].default
        expected = () if name in ("auto_fix", "sinks") else default
        assert getattr(options, name) == expected, name


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"every_n_steps": 0}, ValueError, "every_n_steps must be an integer >= 1, got 0"),
    ({"every_n_steps": True}, ValueError, "every_n_steps must be an integer >= 1, got True"),
    ({"histogram_every_n_steps": -1}, ValueError, "histogram_every_n_steps must be an integer >= 0"),
    ({"history_capacity": 1}, ValueError, "history_capacity must be an integer >= 2"),
    ({"on_error": "ignore"}, ValueError, "on_error must be 'detach' or 'raise', got 'ignore'"),
    ({"hot_path": "gpu"}, ValueError, "hot_path must be one of"),
    ({"auto_fix": ["magic"]}, ValueError, r"auto_fix has unknown fix name\(s\) \['magic'\]; allowed: .*'he_init'"),
    ({"auto_fix_options": {"swap": {}}}, ValueError, r"auto_fix_options has unknown value\(s\) \['swap'\]"),
    ({"auto_fix_options": {"residual": 1}}, TypeError, "auto_fix_options must be a dict of per-fix option dicts"),
    ({"thresholds": {"window": 3}}, TypeError, "thresholds must be a gradwatch.Thresholds, got dict"),
    ({"optimizer": "sgd"}, TypeError, "optimizer must be a torch.optim.Optimizer, got str"),
    ({"scaler": 1.0}, TypeError, "scaler must be a torch.amp.GradScaler, got float"),
])
def test_bad_values_name_the_value_and_what_is_allowed(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        WatchOptions(**kwargs)
    with pytest.raises(error, match="MyCallback: " + match):
        WatchOptions.build("MyCallback", **kwargs)


def test_unknown_and_excluded_names_are_errors_listing_the_allowed_ones() -> None:
    with pytest.raises(TypeError, match=r"X: unknown or inapplicable option\(s\) \['every_n_step'\]; allowed: .*'every_n_steps'"):
        WatchOptions.build("X", every_n_step=2)
    with pytest.raises(TypeError, match=r"inapplicable option\(s\) \['optimizer'\]"):
        WatchOptions.build("X", exclude=("optimizer",), optimizer=None)


def test_values_are_normalised_and_replace_validates_again() -> None:
    options = WatchOptions(auto_fix=True, auto_fix_options={"he_init": {}}, thresholds=Thresholds())
    assert options.auto_fix == auto_fix_names(True) and "skip_spikes" not in options.auto_fix  # opt-in: only by name
    assert WatchOptions(auto_fix="skip_spikes").auto_fix == ("skip_spikes",)
    assert options.replace(every_n_steps=3).every_n_steps == 3
    with pytest.raises(ValueError, match="every_n_steps"):
        options.replace(every_n_steps=0)


def test_the_watcher_keeps_the_options_it_was_built_with() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, optimizer=optimizer, every_n_steps=2, history_capacity=16) as watcher:
        assert watcher.options.every_n_steps == watcher.every_n_steps == 2
        assert watcher.options.optimizer is optimizer
    again = WatchOptions(**watcher.options.as_kwargs())
    assert again == watcher.options


def test_small_checks() -> None:
    assert check_count("n", 0, minimum=0) == 0
    assert check_names("kinds", "a", ("a", "b")) == ("a",)
    assert check_names("kinds", ["b", "a", "b"], ("a", "b")) == ("b", "a")
    with pytest.raises(ValueError, match=r"kinds has unknown finding kind\(s\) \['c'\]; allowed: \('a', 'b'\)"):
        check_names("kinds", ["c"], ("a", "b"), what="finding kind")
