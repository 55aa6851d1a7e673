"""Per-layer gradient statistics against a brute-force float64 computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradwatch.collect import GRAD_METRICS, G, GradientCollector
from gradwatch.layers import discover_layers


def brute_force(layer_params: list[torch.Tensor]) -> dict[str, float]:
    grads = [p.grad.detach().to(torch.float64).reshape(-1) for p in layer_params if p.grad is not None]
    weights = [p.detach().to(torch.float64).reshape(-1) for p in layer_params]
    g = torch.cat(grads) if grads else torch.zeros(0, dtype=torch.float64)
    finite = g[torch.isfinite(g)]
    w = torch.cat(weights)
    wn = float(w.norm())
    gn = float(finite.norm())
    return {
        "grad_norm": gn,
        "grad_mean_abs": float(finite.abs().sum() / max(1, g.numel())),
        "grad_max_abs": float(finite.abs().max()) if finite.numel() else 0.0,
        "grad_zero_frac": float((g == 0).sum() / max(1, g.numel())),
        "nonfinite": float((~torch.isfinite(g)).sum()),
        "weight_norm": wn,
        "grad_to_weight": gn / wn if wn > 0 else math.nan,
    }


def collect(model: nn.Module, slow: bool = True, hot_path: str = "auto") -> tuple[list[str], torch.Tensor]:
    layers = discover_layers(model)
    c = GradientCollector(layers, hot_path=hot_path)
    partials = c.compute_on_device(slow=slow)
    stats = c.finish(partials, [rows.cpu() for _, rows, _ in partials], slow=slow)
    return [layer.name for layer in layers], stats.values


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Conv1d(5, 3, 1), nn.LayerNorm(3))
    return model.to(dtype)


def fill_grads(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=g) * 10 ** torch.randint(-6, 3, (1,), generator=g).item()
        grad[torch.rand(p.shape, generator=g) < 0.2] = 0.0
        p.grad = grad.to(p.dtype)


@pytest.mark.parametrize("hot_path", ["host", "accelerator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_statistics_match_float64_brute_force(dtype: torch.dtype, hot_path: str) -> None:
    model = make_model(dtype)
    fill_grads(model)
    names, values = collect(model, hot_path=hot_path)
    rtol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    for name, layer in zip(names, discover_layers(model), strict=True):
        ref = brute_force(layer.params)
        row = values[names.index(name)]
        for metric, expected in ref.items():
            got = float(row[G[metric]])
            assert got == pytest.approx(expected, rel=rtol, abs=1e-30), (name, metric, dtype)
    assert values.dtype == torch.float64


def test_nonfinite_values_are_counted_and_do_not_poison_finite_statistics() -> None:
    model = make_model()
    fill_grads(model)
    w = model[0].weight.grad
    w[0, 0] = math.nan
    w[1, 1] = math.inf
    w[2, 2] = -math.inf
    names, values = collect(model)
    ref = brute_force(discover_layers(model)[0].params)
    row = values[0]
    assert row[G["nonfinite"]] == 3
    for metric in ("grad_norm", "grad_mean_abs", "grad_max_abs"):
        assert math.isfinite(row[G[metric]])
        assert row[G[metric]] == pytest.approx(ref[metric], rel=1e-6)
    assert values[1, G["nonfinite"]] == 0


def test_huge_finite_values_are_not_reported_as_nonfinite() -> None:
    lin = nn.Linear(4, 4)
    lin.weight.grad = torch.full((4, 4), 1e30)
    lin.bias.grad = torch.zeros(4)
    _, values = collect(lin)
    assert values[0, G["nonfinite"]] == 0
    assert values[0, G["grad_norm"]] == pytest.approx(4e30, rel=1e-6)


def test_missing_gradients_are_nan_not_zero() -> None:
    model = make_model()
    fill_grads(model)
    for p in model[2].parameters():
        p.grad = None
    names, values = collect(model)
    row = values[names.index("2")]
    assert all(math.isnan(row[G[m]]) for m in ("grad_norm", "grad_mean_abs", "grad_max_abs", "nonfinite", "grad_to_weight"))
    assert math.isfinite(values[names.index("0"), G["grad_norm"]])


def test_tied_parameters_are_counted_once_for_their_first_owner() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    layers = discover_layers(model)
    assert [layer.name for layer in layers] == ["0"]
    model(torch.tensor([[1, 2]])).sum().backward()
    _, values = collect(model)
    assert values[0, G["grad_norm"]] == pytest.approx(float(emb.weight.grad.double().norm()), rel=1e-6)


def test_sparse_and_complex_gradients() -> None:
    emb = nn.Embedding(20, 3, sparse=True)
    emb(torch.tensor([1, 1, 4])).sum().backward()
    _, values = collect(emb)
    dense = emb.weight.grad.to_dense().double()
    assert values[0, G["grad_norm"]] == pytest.approx(float(dense.norm()), rel=1e-6)
    assert values[0, G["grad_max_abs"]] == pytest.approx(float(dense.abs().max()), rel=1e-6)

    lin = nn.Linear(3, 2).to(torch.complex64)
    lin(torch.randn(4, 3, dtype=torch.complex64)).abs().sum().backward()
    _, values = collect(lin)
    expected = math.sqrt(float(lin.weight.grad.abs().double().square().sum() + lin.bias.grad.abs().double().square().sum()))
    assert values[0, G["grad_norm"]] == pytest.approx(expected, rel=1e-5)


def test_slow_statistics_only_on_slow_steps_and_weight_norm_is_remembered() -> None:
    model = make_model()
    fill_grads(model)
    layers = discover_layers(model)
    c = GradientCollector(layers)
    p = c.compute_on_device(slow=True)
    first = c.finish(p, [r.cpu() for _, r, _ in p], slow=True).values
    p = c.compute_on_device(slow=False)
    second = c.finish(p, [r.cpu() for _, r, _ in p], slow=False).values
    assert math.isnan(second[0, G["grad_zero_frac"]]) and math.isnan(second[0, G["weight_norm"]])
    assert second[0, G["grad_to_weight"]] == pytest.approx(first[0, G["grad_to_weight"]])


def test_update_ratio_measures_one_optimizer_step() -> None:
    lin = nn.Linear(6, 6)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    c = GradientCollector(discover_layers(lin))
    lin(torch.randn(3, 6)).sum().backward()
    p = c.compute_on_device(slow=True)
    c.finish(p, [r.cpu() for _, r, _ in p], slow=True)
    before = torch.cat([q.detach().reshape(-1).double().clone() for q in lin.parameters()])
    opt.step()
    after = torch.cat([q.detach().reshape(-1).double() for q in lin.parameters()])
    p = c.compute_on_device(slow=False)
    values = c.finish(p, [r.cpu() for _, r, _ in p], slow=False).values
    assert values[0, G["update_ratio"]] == pytest.approx(float((after - before).norm() / before.norm()), rel=1e-5)


def test_metric_names_are_stable() -> None:
    assert GRAD_METRICS == (
        "grad_norm", "grad_mean_abs", "grad_max_abs", "grad_zero_frac", "nonfinite", "weight_norm",
        "grad_to_weight", "update_ratio",
    )


def test_fast_steps_repair_tiny_gradients_but_not_known_zero_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between slow steps max |g| is not measured: a float32 sum of squares that underflowed is told
    apart from an exactly-zero gradient by the layer's last measured max |g|."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[1].weight.grad.fill_(1e-30)  # squares underflow float32: the sum of squares reads 0
    c = GradientCollector(discover_layers(model))
    repaired: list[list[int]] = []
    real = GradientCollector._repair

    def spy(self: GradientCollector, rows, nonfinite, bad, slow):  # noqa: ANN001
        repaired.append(list(bad))
        return real(self, rows, nonfinite, bad, slow)

    monkeypatch.setattr(GradientCollector, "_repair", spy)

    def step(slow: bool) -> torch.Tensor:
        partials = c.compute_on_device(slow=slow)
        return c.finish(partials, [rows.cpu() for _, rows, _ in partials], slow=slow).values

    first = step(slow=True)
    assert repaired == [[1]]
    assert first[1, G["grad_norm"]] == pytest.approx(4e-30, rel=1e-6)
    assert first[0, G["grad_norm"]] == 0 and first[2, G["grad_norm"]] == 0
    fast = step(slow=False)
    assert repaired[-1] == [1]  # the tiny layer again, never the layers known to be exactly zero
    assert fast[1, G["grad_norm"]] == pytest.approx(4e-30, rel=1e-6)
    assert math.isnan(fast[1, G["grad_max_abs"]])
    model[2].weight.grad.fill_(1e-30)  # a zero layer turns tiny between slow steps: still measured
    fast = step(slow=False)
    assert repaired[-1] == [1]
    assert fast[2, G["grad_norm"]] == 0.0  # ...as 0 until the next slow step (documented)
    slow = step(slow=True)
    assert repaired[-1] == [1, 2] and slow[2, G["grad_norm"]] == pytest.approx(4e-30, rel=1e-6)


def test_gradients_of_mixed_dtypes_or_missing_ones_take_the_general_path() -> None:
    # the common-case shortcut (one device, one dtype, every gradient present) must not change results
    model = make_model()
    model[3].double()  # mixed dtypes
    fill_grads(model)
    model[3].bias.grad = None  # a missing gradient
    names, values = collect(model)
    for name, layer in zip(names, discover_layers(model), strict=True):
        ref = brute_force(layer.params)
        for metric, expected in ref.items():
            assert float(values[names.index(name)][G[metric]]) == pytest.approx(expected, rel=1e-5, abs=1e-30)
