"""Reference models: the registry, reproducibility, and — with real (small) training — that every
problem case shows its problem, that its twin and the healthy controls do not, and that every
cure at least halves the loss reached in the same number of steps.

The measurements here are plain torch (no gradwatch core), so they check the models themselves.
Trained cases are cached per module: each case is trained once, for its ``default_steps``.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from gradwatch import models, tasks
from gradwatch.findings import FIX_NAMES

NAMES = models.list_models()
META = {name: models.create(name) for name in NAMES}  # metadata only: never trained
PROBLEM_CASES = [name for name in NAMES if META[name].problem is not None]
CALM_CASES = [name for name in NAMES if META[name].problem is None]
#: Cases whose training takes more than ~3 s on one core.
SLOW = {"plain_cnn", "plain_cnn_fixed", "vanilla_rnn", "vanilla_rnn_fixed", "exploding_rnn",
        "exploding_rnn_fixed", "resnet_bn", "transformer_preln"}

VANISHING_RATIO = 1e-3  # first/last layer gradient norm below this: vanishing
HEALTHY_RATIO = 1e-2  # ... and a healthy model stays above this (a decade of margin)
EXPLODING_GRAD_TO_WEIGHT = 10.0  # one SGD step would move the layer by 10x its own size
HEALTHY_GRAD_TO_WEIGHT = 2.0


def _params(names: list[str], slow: set[str] = SLOW) -> list:
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and do not fight over a shared machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def trained(name: str) -> tuple[models.ReferenceCase, tuple[float, ...]]:
    """The case ``name`` (seed 0) after ``default_steps`` of training, and its losses."""
    case = models.create(name, seed=0)
    return case, tuple(models.train(case))


# ----------------------------------------------------------------------------------------------
# Plain-torch measurements


def gradient_snapshot(case: models.ReferenceCase, steps: int = 4) -> dict[str, tuple[float, float]]:
    """``{layer: (grad norm, weight norm)}`` at the last of ``steps`` training steps.

    A layer is a module owning parameters directly; the dict is in registration order, which is
    forward order for every reference model.
    """
    snapshot: dict[str, tuple[float, float]] = {}

    def capture(step: int) -> None:
        if step == steps - 1:
            for name, module in case.model.named_modules():
                params = [p for p in module.parameters(recurse=False) if p.grad is not None]
                if params:
                    grad = torch.cat([p.grad.flatten() for p in params]).norm().item()
                    weight = torch.cat([p.detach().flatten() for p in params]).norm().item()
                    snapshot[name] = (grad, weight)

    models.train(case, steps, on_backward=capture)
    return snapshot


def first_last_ratio(snapshot: dict[str, tuple[float, float]]) -> float:
    norms = [grad for grad, _ in snapshot.values()]
    return norms[0] / norms[-1]


def max_grad_to_weight(snapshot: dict[str, tuple[float, float]], model: nn.Module | None = None) -> float:
    """Largest grad/weight ratio; with ``model``, layers whose weights are near zero (RMS below a tenth of
    1/sqrt(fan_in): a zero-initialised residual branch's last layer) are left out, as gradwatch's own rule
    leaves them out: their ratio is large by construction."""
    def near_zero(name: str) -> bool:
        weight = getattr(model.get_submodule(name), "weight", None) if model is not None else None
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            return False
        return float(weight.detach().square().mean().sqrt()) < 0.1 / math.sqrt(weight[0].numel())

    return max(grad / weight for name, (grad, weight) in snapshot.items() if not near_zero(name))


@torch.no_grad()
def activation_fractions(case: models.ReferenceCase) -> dict[str, float]:
    """Per activation module on ``case.batch(0)``: for ReLUs the fraction of units dead across the
    whole batch (a conv channel is one unit), for sigmoid/tanh the fraction of outputs within 0.01
    of their bounds."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out))
        for name, module in case.model.named_modules()
        if isinstance(module, nn.ReLU | nn.Sigmoid | nn.Tanh)
    ]
    try:
        case.model(case.batch(0)[0])
    finally:
        for handle in handles:
            handle.remove()
    fractions = {}
    for name, out in outputs.items():
        module = case.model.get_submodule(name)
        if isinstance(module, nn.ReLU):
            per_unit = out.transpose(0, 1).flatten(1)  # (units, batch * positions)
            fractions[name] = (per_unit <= 0).all(dim=1).float().mean().item()
        elif isinstance(module, nn.Sigmoid):
            fractions[name] = ((out < 0.01) | (out > 0.99)).float().mean().item()
        else:
            fractions[name] = (out.abs() > 0.99).float().mean().item()
    return fractions


# ----------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_every_required_case_sorted():
    required = {
        "sigmoid_mlp", "tanh_tiny_init", "plain_cnn", "vanilla_rnn", "exploding_rnn",
        "overscaled_relu_mlp", "dead_relu_mlp", "saturated_sigmoid",
        "resnet_bn", "transformer_preln", "shallow_relu_mlp",
    }
    assert NAMES == sorted(NAMES)
    assert required <= set(NAMES)
    assert models.list_models("*rnn*") == ["exploding_rnn", "exploding_rnn_fixed", "vanilla_rnn", "vanilla_rnn_fixed"]


def test_the_package_exports_its_names_and_every_registered_factory():
    assert all(hasattr(models, name) for name in models.__all__)
    for name in NAMES:
        assert name in models.__all__ and getattr(models, name).__name__ == name


def test_unknown_name_is_an_error_naming_the_available_models():
    with pytest.raises(ValueError, match="'nope'.*sigmoid_mlp"):
        models.create("nope")


def test_register_model_adds_a_case_and_refuses_duplicates():
    @models.register_model
    def tiny_test_case(seed: int = 0) -> models.ReferenceCase:
        data = tasks.teacher_classification(torch.Generator().manual_seed(seed), n=64)
        return models.ReferenceCase(
            name="tiny_test_case", model=nn.Linear(16, 4), loss_fn=nn.functional.cross_entropy,
            inputs=data[0], targets=data[1], optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            batch_size=16, default_steps=3, problem=None, twin=None, cure=(), description="test",
        )

    try:
        assert "tiny_test_case" in models.list_models()
        assert len(models.train(models.create("tiny_test_case"))) == 3
        with pytest.raises(ValueError, match="already registered"):
            models.register_model(tiny_test_case)
    finally:
        models.registry._REGISTRY.pop("tiny_test_case")


def test_register_twins_adds_a_problem_and_its_linked_twin_from_one_builder():
    def build(seed: int, fixed: bool) -> models.Setup:
        data = tasks.teacher_classification(torch.Generator().manual_seed(seed), n=64)
        model = nn.Sequential(nn.Linear(16, 8), nn.ReLU() if fixed else nn.Sigmoid(), nn.Linear(8, 4))
        return models.Setup(model, data, lambda p: torch.optim.SGD(p, lr=0.1), batch_size=16, default_steps=2)

    problem, fixed = models.register_twins(
        "tiny_pair", build, problem="vanishing", cure=("swap_activation",), summaries=("sick", "well"),
        description="the problem", fixed_description="the twin",
    )
    try:
        assert (problem.__name__, fixed.__name__, problem.__doc__, fixed.__doc__) == (
            "tiny_pair", "tiny_pair_fixed", "sick", "well")
        assert models.list_models("tiny_pair*") == ["tiny_pair", "tiny_pair_fixed"]
        sick, well = models.create("tiny_pair", seed=2), models.create("tiny_pair_fixed", seed=2)
        assert (sick.problem, sick.twin, sick.cure, sick.description, sick.seed) == (
            "vanishing", "tiny_pair_fixed", ("swap_activation",), "the problem", 2)
        assert (well.problem, well.twin, well.cure, well.description) == (
            None, "tiny_pair", ("swap_activation",), "the twin")
        assert isinstance(sick.model[1], nn.Sigmoid) and isinstance(well.model[1], nn.ReLU)
        assert torch.equal(sick.inputs, well.inputs) and torch.equal(sick.model[0].weight, well.model[0].weight)
        assert len(models.train(well)) == 2
    finally:
        for name in ("tiny_pair", "tiny_pair_fixed"):
            models.registry._REGISTRY.pop(name)


def test_reference_case_validates_its_fields():
    case = META["shallow_relu_mlp"]
    fields = dict(name="x", model=case.model, loss_fn=case.loss_fn, inputs=case.inputs, targets=case.targets,
                  optimizer=case.optimizer, batch_size=64, default_steps=1, twin=None, description="")
    with pytest.raises(ValueError, match="problem='slow'"):
        models.ReferenceCase(problem="slow", cure=(), **fields)
    with pytest.raises(ValueError, match="unknown fix names.*'more_data'"):
        models.ReferenceCase(problem=None, cure=("more_data",), **fields)
    with pytest.raises(ValueError, match="batch_size"):
        models.ReferenceCase(problem=None, cure=(), **{**fields, "batch_size": 0})


@pytest.mark.parametrize("name", NAMES)
def test_metadata_is_consistent(name):
    case = META[name]
    assert case.name == name
    assert case.problem in (*models.PROBLEMS, None)
    assert set(case.cure) <= set(FIX_NAMES)
    assert len(case.description) > 80
    if case.twin is None:  # healthy control
        assert case.problem is None and case.cure == ()
        return
    twin = META[case.twin]
    assert twin.twin == name and twin.cure == case.cure and case.cure
    assert (case.problem is None) != (twin.problem is None), "exactly one of a pair shows a problem"
    problem, fixed = (case, twin) if case.problem else (twin, case)
    assert fixed.name == problem.name + models.TWIN_SUFFIX
    for fix in problem.cure:
        assert fix in problem.description, f"{problem.name}'s description should name its cure {fix}"
    # Same task, same data, same recipe: only the cure differs.
    assert torch.equal(problem.inputs, fixed.inputs) and torch.equal(problem.targets, fixed.targets)
    assert (problem.batch_size, problem.default_steps) == (fixed.batch_size, fixed.default_steps)
    assert problem.optimizer.func is fixed.optimizer.func and problem.optimizer.keywords == fixed.optimizer.keywords


@pytest.mark.parametrize("name", NAMES)
def test_create_is_bitwise_reproducible_and_leaves_the_global_rng_alone(name):
    rng = torch.get_rng_state()
    a, b, other = models.create(name, seed=0), models.create(name, seed=0), models.create(name, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, other.inputs)
    assert any(not torch.equal(v, other.model.state_dict()[k]) for k, v in state_a.items() if v.is_floating_point())


@pytest.mark.parametrize("name", NAMES)
def test_layer_names_are_stable_and_twins_keep_parameter_names(name):
    case, other_seed = META[name], models.create(name, seed=3)
    assert [n for n, _ in case.model.named_modules()] == [n for n, _ in other_seed.model.named_modules()]
    if case.problem is None:
        return
    twin = META[case.twin]
    shapes = {k: v.shape for k, v in case.model.state_dict().items()}
    twin_shapes = {k: v.shape for k, v in twin.model.state_dict().items()}
    if set(case.cure) <= {"he_init", "swap_activation", "clip_gradients"}:
        assert shapes == twin_shapes  # re-initialised or re-activated in place
        assert [n for n, _ in case.model.named_modules()] == [n for n, _ in twin.model.named_modules()]
    elif case.cure == ("insert_batchnorm",):
        assert shapes.items() <= twin_shapes.items()  # the same layers, plus BatchNorms
        assert any(isinstance(m, nn.BatchNorm2d) for m in twin.model.modules())
    elif case.cure == ("lstm_gru",):
        assert shapes["head.weight"] == twin_shapes["head.weight"]
        assert type(twin.model.rnn) in (nn.LSTM, nn.GRU)
        assert twin.model.rnn.hidden_size == case.model.rnn.hidden_size


def test_sigmoid_mlp_layer_names():
    names = [n for n, m in META["sigmoid_mlp"].model.named_modules() if n]
    depth = models.SIGMOID_MLP_DEPTH
    assert names == [x for i in range(1, depth + 1) for x in (f"fc{i}", f"act{i}")] + ["head"]


# ----------------------------------------------------------------------------------------------
# The training loop


def test_train_is_deterministic_and_calls_the_hook_with_gradients():
    seen = []

    def on_backward(step: int) -> None:
        seen.append((step, all(p.grad is not None for p in case.model.parameters())))

    case = models.create("sigmoid_mlp", seed=0)
    losses = models.train(case, 5, on_backward=on_backward)
    again = models.train(models.create("sigmoid_mlp", seed=0), 5)
    assert losses == again and len(losses) == 5 and all(isinstance(v, float) for v in losses)
    assert seen == [(i, True) for i in range(5)]
    assert all(p.grad is None for p in case.model.parameters())  # zero_grad(set_to_none) after each step


def test_train_hands_each_loss_to_on_loss_before_on_backward():
    calls = []
    case = models.create("shallow_relu_mlp", seed=0)
    losses = models.train(case, 3, start_step=2, on_backward=lambda step: calls.append(("backward", step)),
                          on_loss=lambda step, loss: calls.append(("loss", step, float(loss.detach()), loss.requires_grad)))
    assert calls == [c for step, value in zip(range(2, 5), losses, strict=True)
                     for c in (("loss", step, value, True), ("backward", step))]


def test_train_resumes_with_the_next_batches_and_a_given_optimizer():
    whole_case = models.create("shallow_relu_mlp", seed=0)
    whole = models.train(whole_case, 6)
    case = models.create("shallow_relu_mlp", seed=0)
    optimizer = case.make_optimizer()
    parts = models.train(case, 3, optimizer=optimizer) + models.train(case, 3, optimizer=optimizer, start_step=3)
    assert parts == whole


def test_batches_cycle_through_the_data_in_order():
    case = META["shallow_relu_mlp"]
    period = case.steps_per_epoch
    assert period == len(case.inputs) // case.batch_size
    x0, y0 = case.batch(0)
    assert torch.equal(x0, case.inputs[: case.batch_size]) and torch.equal(y0, case.targets[: case.batch_size])
    assert torch.equal(case.batch(period + 1)[0], case.batch(1)[0])
    assert [torch.equal(x, case.batch(i + 2)[0]) for i, (x, _) in enumerate(case.batches(3, start=2))] == [True] * 3


def test_clipping_twin_clips_after_the_hook():
    """Observers see the raw gradient; the optimizer sees it clipped to ``clip_grad_norm``."""
    case = models.create("exploding_rnn_fixed", seed=0)
    raw, clipped = [], []
    optimizer = case.make_optimizer()
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: clipped.append(nn.utils.get_total_norm([p.grad for p in case.model.parameters()]))
    )
    models.train(case, 2, optimizer=optimizer,
                 on_backward=lambda step: raw.append(nn.utils.get_total_norm([p.grad for p in case.model.parameters()])))
    assert raw[0] > 100 * case.clip_grad_norm
    assert all(norm <= case.clip_grad_norm * (1 + 1e-4) for norm in clipped)


def test_final_loss():
    assert models.final_loss([5.0] * 5 + [1.0, 3.0], window=2) == 2.0
    assert models.final_loss([1.0, 2.0]) == 1.5
    assert models.final_loss([1.0, float("nan")]) == math.inf
    with pytest.raises(ValueError):
        models.final_loss([])


# ----------------------------------------------------------------------------------------------
# Tasks


def test_tasks_shapes_and_labels():
    g = torch.Generator().manual_seed(0)
    x, y = tasks.grating_images(g, n=8, size=16)
    assert x.shape == (8, 1, 16, 16) and y.dtype == torch.int64
    x, y = tasks.first_token_sequences(g, n=8, length=20)
    assert x.shape == (8, 20, 1) and torch.equal(x[:, 0, 0], 2.0 * y - 1)
    x, y = tasks.recent_token_sequences(g, n=8, length=10, classes=4, lag=2)
    assert x.shape == (8, 10, 4) and torch.equal(x[:, 7].argmax(-1), y)
    with pytest.raises(ValueError, match="lag=10"):
        tasks.recent_token_sequences(g, length=10, lag=10)
    tokens, y = tasks.majority_token_sequences(g, n=8, length=16, vocab=4)
    counts = nn.functional.one_hot(tokens, 4).sum(1)
    assert torch.equal(counts.gather(1, y[:, None]).squeeze(1), counts.max(1).values)


# ----------------------------------------------------------------------------------------------
# Every cure at least halves the loss; the healthy controls learn


@pytest.mark.parametrize("name", _params(PROBLEM_CASES))
def test_twin_reaches_at_most_half_the_loss_of_its_problem(name):
    _, problem_losses = trained(name)
    twin_name = META[name].twin
    _, twin_losses = trained(twin_name)
    problem, fixed = models.final_loss(problem_losses), models.final_loss(twin_losses)
    assert fixed <= 0.5 * problem, f"{twin_name}: {fixed:.4f} vs {name}: {problem:.4f}"


@pytest.mark.parametrize("name", _params([n for n in CALM_CASES if META[n].twin is None]))
def test_healthy_controls_learn(name):
    case, losses = trained(name)
    chance = math.log(int(case.targets.max()) + 1)
    assert models.final_loss(losses) < 0.25 * chance


# ----------------------------------------------------------------------------------------------
# Each problem is real (plain torch measurements); twins and healthy controls show none of it

VANISHING_BY_DEPTH = ["sigmoid_mlp", "tanh_tiny_init", "plain_cnn"]


@pytest.mark.parametrize("name", VANISHING_BY_DEPTH)
def test_vanishing_cases_decay_across_depth(name):
    snapshot = gradient_snapshot(models.create(name, seed=0))
    assert first_last_ratio(snapshot) < VANISHING_RATIO
    assert max_grad_to_weight(snapshot) < HEALTHY_GRAD_TO_WEIGHT  # vanishing, not exploding


@pytest.mark.parametrize("name", [n for n in CALM_CASES if n != "exploding_rnn_fixed"])
def test_calm_cases_show_no_problem_early_in_training(name):
    case = models.create(name, seed=0)
    snapshot = gradient_snapshot(case)
    assert first_last_ratio(snapshot) > HEALTHY_RATIO
    assert max_grad_to_weight(snapshot, case.model) < HEALTHY_GRAD_TO_WEIGHT
    for layer, fraction in activation_fractions(case).items():
        limit = 0.5 if isinstance(case.model.get_submodule(layer), nn.ReLU) else 0.1
        assert fraction < limit, f"{layer}: {fraction:.2f}"


def test_vanilla_rnn_gradient_vanishes_through_time_and_its_twin_keeps_it():
    problem = models.hidden_grad_norms_per_step(models.create("vanilla_rnn", seed=0))
    assert problem.shape == (models.RNN_LENGTH,)
    assert problem[0] / problem[-1] < 1e-6
    fixed = models.hidden_grad_norms_per_step(models.create("vanilla_rnn_fixed", seed=0))
    assert fixed[0] / fixed[-1] > HEALTHY_RATIO


@pytest.mark.slow
def test_trained_gru_twin_carries_the_gradient_to_the_first_step():
    case, _ = trained("vanilla_rnn_fixed")
    norms = models.hidden_grad_norms_per_step(case)
    assert norms[0] / norms[-1] > 0.1


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
def test_hidden_grad_norms_match_the_full_sequence_at_the_last_step(cell):
    """The step-by-step re-run computes what the fused forward does: at t=T both see only the head."""
    case = models.create("vanilla_rnn", seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        case.model.rnn = cell(1, models.RNN_HIDDEN, batch_first=True)
    norms = models.hidden_grad_norms_per_step(case)
    inputs, targets = case.batch(0)
    outputs, _ = case.model.rnn(inputs)
    last = outputs[:, -1]
    (grad,) = torch.autograd.grad(case.loss_fn(case.model.head(last), targets), last)
    assert norms.shape == (models.RNN_LENGTH,) and torch.isfinite(norms).all()
    torch.testing.assert_close(norms[-1], grad.norm())


def test_hidden_grad_norms_leave_grads_alone_and_need_a_recurrent_case():
    case = models.create("vanilla_rnn", seed=0)
    models.hidden_grad_norms_per_step(case, case.batch(1))
    assert all(p.grad is None for p in case.model.parameters())
    with pytest.raises(TypeError, match="RecurrentClassifier"):
        models.hidden_grad_norms_per_step(models.create("sigmoid_mlp"))


def test_exploding_rnn_gradients_grow_back_through_time():
    case = models.create("exploding_rnn", seed=0)
    through_time = models.hidden_grad_norms_per_step(case)
    assert through_time[0] / through_time[-1] > 1e3
    rnn_grad, rnn_weight = gradient_snapshot(case, steps=1)["rnn"]
    assert rnn_grad / rnn_weight > EXPLODING_GRAD_TO_WEIGHT


@pytest.mark.slow
def test_clipped_rnn_twin_calms_down():
    """Clipping does not change the first gradients; training under it removes their cause."""
    case, _ = trained("exploding_rnn_fixed")
    inputs, targets = case.batch(case.default_steps)
    loss = case.loss_fn(case.model(inputs), targets)
    params = list(case.model.parameters())
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).norm()
    weight = torch.cat([p.detach().flatten() for p in params]).norm()
    assert grad / weight < 1e-2


def test_overscaled_relu_mlp_explodes_flat_across_depth():
    case = models.create("overscaled_relu_mlp", seed=0)
    snapshot = gradient_snapshot(case)
    hidden = [snapshot[f"fc{i}"] for i in range(1, models.OVERSCALED_DEPTH + 1)]
    assert all(grad / weight > EXPLODING_GRAD_TO_WEIGHT for grad, weight in hidden)
    grads = [grad for grad, _ in hidden]
    assert max(grads) / min(grads) < 10  # huge but flat: no growth across depth to detect
    with torch.no_grad():  # the forward signal grows with depth instead
        x = case.batch(0)[0]
        sizes = []
        for module in case.model:
            x = module(x)
            if isinstance(module, nn.ReLU):
                sizes.append(x.norm().item())
    assert sizes[-1] / sizes[0] > 100


def test_clipping_is_no_cure_for_the_adam_trained_overscaled_mlp():
    """Adam's updates are ~lr whatever the gradient's scale: the cause is the initialisation."""
    case = models.create("overscaled_relu_mlp", seed=0)
    case.clip_grad_norm = 1.0
    clipped = models.final_loss(models.train(case))
    assert clipped > 10 * models.final_loss(trained("overscaled_relu_mlp_fixed")[1])


def test_dead_relu_mlp_has_mostly_dead_units():
    fractions = activation_fractions(models.create("dead_relu_mlp", seed=0))
    assert fractions["act1"] > 0.5
    assert max(activation_fractions(models.create("dead_relu_mlp_fixed", seed=0)).values()) < 0.1


def test_saturated_sigmoid_is_mostly_saturated():
    fractions = activation_fractions(models.create("saturated_sigmoid", seed=0))
    assert fractions and min(fractions.values()) > 0.5
    assert max(activation_fractions(models.create("saturated_sigmoid_fixed", seed=0)).values()) < 0.05
