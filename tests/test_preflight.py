"""Preflight probing and the pytest helper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gw_testing import SmallResNet, image_task, mlp, vector_task
from torch import nn

import gradwatch
from gradwatch.testing import assert_healthy_gradients


def test_probing_leaves_the_model_exactly_as_it_was() -> None:
    model = SmallResNet()
    x, y = image_task()(0)
    F.cross_entropy(model(x), y).backward()  # user gradients and BN statistics already there
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    result = gradwatch.preflight(model, (x, y), F.cross_entropy)
    assert result.diagnosis.healthy and not result.report.changed
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert all(not m._forward_hooks for m in model.modules())


def test_preflight_fixes_a_deep_sigmoid_mlp_before_training() -> None:
    model = mlp(nn.Sigmoid, 10)
    batch = vector_task()(0)
    result = gradwatch.preflight(model, batch, F.cross_entropy)
    assert "vanishing" in result.diagnosis.kinds()
    assert isinstance(model[0][1], nn.BatchNorm1d)  # a norm after the first Linear, inside a Sequential at "0"
    assert gradwatch.preflight(model, batch, F.cross_entropy, fix=False).diagnosis.healthy


def test_recommend_only_changes_nothing_and_gives_code() -> None:
    model = mlp(nn.Sigmoid, 10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = gradwatch.preflight(model, vector_task()(0), F.cross_entropy, fix=False)
    assert result.report.dry_run and "nn.BatchNorm1d(32)" in result.report.code
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], nn.Sigmoid)


def test_assert_healthy_gradients() -> None:
    assert_healthy_gradients(SmallResNet(), image_task()(0), F.cross_entropy)
    with pytest.raises(AssertionError, match="vanishing"):
        assert_healthy_gradients(mlp(nn.Sigmoid, 12), vector_task()(0), F.cross_entropy)


def test_bad_batch_and_loss_are_clear_errors() -> None:
    with pytest.raises(TypeError, match=r"\(inputs, target\)"):
        gradwatch.preflight(mlp(nn.ReLU, 3), torch.randn(4, 16), F.cross_entropy)
    with pytest.raises(TypeError, match="scalar"):
        gradwatch.preflight(mlp(nn.ReLU, 3), vector_task()(0), lambda out, y: out)
