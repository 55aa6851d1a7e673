"""Reference models: every gradient-flow problem gradwatch diagnoses, and its fixed twin.

Each *reference case* is a small model plus a small synthetic task generated in-process
(:mod:`gradwatch.tasks`, no downloads), an optimizer recipe and a step budget, all a pure
function of one seed. Problem cases show one problem each (``case.problem``); their fixed twin
(``case.twin``) is the same network after the fixes named in ``case.cure`` — the model that
:func:`gradwatch.apply_fixes` should turn the problem into. Healthy controls have neither.
The fixes are demonstrably cures: trained for ``default_steps`` from the same seed, every twin
reaches at most half the final loss of its problem model (``tests/test_models.py`` checks it).

Cases live in a registry, as in timm::

    from gradwatch import models

    models.list_models()                        # sorted names
    case = models.create("sigmoid_mlp", seed=0)  # a ReferenceCase
    losses = models.train(case)                  # plain loop, returns the per-step losses
    twin = models.create(case.twin, seed=0)      # "sigmoid_mlp_fixed"

Add a case with :func:`register_model` on a function ``name(seed) -> ReferenceCase``.

Layer names are stable and readable (``fc1``, ``act1``, ..., ``head``; ``conv1``, ``bn1``...; ``rnn``,
``head``), and a twin whose cure keeps the parameters (``he_init``, ``swap_activation``,
``clip_gradients``) has exactly the parameter names and shapes of its problem model.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradwatch import tasks
from gradwatch.fixes.registry import list_fixes

log = logging.getLogger(__name__)

#: Problems a reference case can show; ``None`` means a healthy control or a fixed twin.
PROBLEMS: tuple[str, ...] = ("vanishing", "exploding", "dead_units", "saturation", "spike")

#: Suffix of a problem case's fixed twin: ``"sigmoid_mlp"`` -> ``"sigmoid_mlp_fixed"``.
TWIN_SUFFIX = "_fixed"

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ReferenceCase:
    """A model, its synthetic task and training recipe, and what it demonstrates.

    Attributes:
        name: registry name, e.g. ``"sigmoid_mlp"``.
        model: the freshly initialised network (training mode).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``.
        inputs: the whole synthetic training set, first dimension = examples.
        targets: the matching targets.
        optimizer: builds the optimizer from parameters (use :meth:`make_optimizer`).
        batch_size: examples per step; :meth:`batch` walks the data set in order, cycling.
        default_steps: steps after which the problem and its twin are compared.
        problem: ``"vanishing" | "exploding" | "dead_units" | "saturation" | "spike"``, or ``None``.
        twin: the fixed twin's name for a problem case, the problem's name for a twin, else ``None``.
        cure: fix names (see ``gradwatch.fixes.list_fixes()``) that turn the problem into the
            twin; on a twin, the fixes it embodies; empty for healthy controls.
        description: which problem it shows, the mechanism, and which fix cures it.
        seed: the seed the model and data were generated from.
        clip_grad_norm: global gradient-norm threshold applied by :func:`train` after the
            ``on_backward`` hook (so observers see the unclipped gradients), or ``None``.
    """

    name: str
    model: nn.Module = field(repr=False)
    loss_fn: LossFn = field(repr=False)
    inputs: Tensor = field(repr=False)
    targets: Tensor = field(repr=False)
    optimizer: OptimizerFactory = field(repr=False)
    batch_size: int
    default_steps: int
    problem: str | None
    twin: str | None
    cure: tuple[str, ...]
    description: str = field(repr=False)
    seed: int = 0
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.problem is not None and self.problem not in PROBLEMS:
            raise ValueError(f"problem={self.problem!r} is not one of {PROBLEMS} or None")
        unknown = [fix for fix in self.cure if fix not in list_fixes()]
        if unknown:
            raise ValueError(f"unknown fix names {unknown} in cure; allowed: {tuple(list_fixes())}")
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.targets)} targets")
        if not 0 < self.batch_size <= len(self.inputs):
            raise ValueError(f"batch_size={self.batch_size} must be in [1, {len(self.inputs)}]")
        self.cure = tuple(self.cure)

    @property
    def steps_per_epoch(self) -> int:
        """Number of distinct batches; :meth:`batch` repeats with this period."""
        return len(self.inputs) // self.batch_size

    def make_optimizer(self, params: Iterable[nn.Parameter] | None = None) -> torch.optim.Optimizer:
        """The case's optimizer over ``params`` (default: all of ``self.model``'s parameters)."""
        return self.optimizer(self.model.parameters() if params is None else params)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The ``(inputs, targets)`` of training step ``step``: deterministic, no RNG consumed."""
        start = (step % self.steps_per_epoch) * self.batch_size
        return self.inputs[start : start + self.batch_size], self.targets[start : start + self.batch_size]

    def batches(self, steps: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of steps ``start, ..., start + steps - 1``."""
        for step in range(start, start + steps):
            yield self.batch(step)


_REGISTRY: dict[str, Callable[[int], ReferenceCase]] = {}


def register_model(factory: Callable[[int], ReferenceCase]) -> Callable[[int], ReferenceCase]:
    """Register ``factory(seed) -> ReferenceCase`` under its function name (a decorator).

    :func:`create` calls the factory with the global RNG seeded by ``seed`` (and restored
    afterwards), so modules may use PyTorch's default initialisers; the data should come from a
    ``torch.Generator`` seeded with the same seed, so a problem and its twin see the same data.

    Raises:
        ValueError: if the name is already registered.
    """
    name = factory.__name__
    if name in _REGISTRY:
        raise ValueError(f"reference model {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered cases matching a shell-style ``pattern`` (e.g. ``"*rnn*"``)."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatchcase(name, pattern))


def create(name: str, seed: int = 0) -> ReferenceCase:
    """Build the reference case ``name``: a new model and data set, bitwise identical for a seed.

    The global RNG is used for initialisation under ``torch.random.fork_rng``: the caller's RNG
    state is left untouched.

    Args:
        name: one of :func:`list_models`.
        seed: seeds the model's initialisation and the task's data. Default: ``0``.

    Raises:
        ValueError: if ``name`` is not registered (the message lists the registered names).
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown reference model {name!r}; available: {', '.join(list_models())}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        case = factory(seed)
    if case.name != name:
        raise ValueError(f"factory {name!r} returned a case named {case.name!r}")
    log.debug("created reference case %s (seed %d): problem=%s, twin=%s", name, seed, case.problem, case.twin)
    return case


def train(
    case: ReferenceCase,
    steps: int | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    on_backward: Callable[[int], None] | None = None,
    start_step: int = 0,
) -> list[float]:
    """Train ``case.model`` with a plain loop and return the loss of every step.

    Each step: forward, loss, backward, ``on_backward(step)`` (where a watcher reads the
    gradients), clipping if ``case.clip_grad_norm`` is set, ``optimizer.step()``,
    ``optimizer.zero_grad()``. Losses are kept on the device and copied to the host once, at the
    end. No randomness is consumed, so the same case and seed give the same losses.

    These models are tiny: on a shared CPU, ``torch.set_num_threads(1)`` is often several times
    faster than the default (small recurrent ops suffer most from oversubscribed threads).

    Args:
        case: the reference case; its model is trained in place.
        steps: number of steps. Default: ``case.default_steps``.
        optimizer: the optimizer to step (pass it to keep its state across calls, or to let a
            watcher hook it). Default: a new ``case.make_optimizer()``.
        on_backward: called with the step index after ``backward()``, before the update.
        start_step: index of the first step, so that a resumed run continues with the next
            batches. Default: ``0``.

    Returns:
        The per-step training losses.
    """
    steps = case.default_steps if steps is None else steps
    optimizer = case.make_optimizer() if optimizer is None else optimizer
    model = case.model
    model.train()
    losses: list[Tensor] = []
    for step in range(start_step, start_step + steps):
        inputs, targets = case.batch(step)
        loss = case.loss_fn(model(inputs), targets)
        loss.backward()
        if on_backward is not None:
            on_backward(step)
        if case.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), case.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses).tolist() if losses else []


def final_loss(losses: Sequence[float], window: int = 10) -> float:
    """Smoothed final loss: the mean of the last ``window`` losses (``inf`` if any is non-finite).

    This is the number the acceptance criterion compares: a twin must reach at most half of its
    problem model's ``final_loss`` after the same number of steps.
    """
    if not losses:
        raise ValueError("final_loss() needs at least one loss")
    tail = list(losses)[-window:]
    if not all(math.isfinite(v) for v in tail):
        return math.inf
    return sum(tail) / len(tail)


# ----------------------------------------------------------------------------------------------
# Building blocks


def mlp(
    in_features: int, width: int, depth: int, out_features: int, activation: type[nn.Module]
) -> nn.Sequential:
    """``depth`` hidden ``Linear`` + activation pairs and a linear ``head``, as a named Sequential.

    Names are ``fc1, act1, ..., fc{depth}, act{depth}, head``: stable across seeds and twins,
    and each activation is a module, so hooks can see it and fixes can swap it.
    """
    layers: list[tuple[str, nn.Module]] = []
    features = in_features
    for i in range(1, depth + 1):
        layers += [(f"fc{i}", nn.Linear(features, width)), (f"act{i}", activation())]
        features = width
    layers.append(("head", nn.Linear(features, out_features)))
    return nn.Sequential(OrderedDict(layers))


def plain_convnet(
    channels: int, depth: int, classes: int, activation: type[nn.Module], batchnorm: bool = False
) -> nn.Sequential:
    """``depth`` 3x3 convolutions (each optionally followed by BatchNorm) with activations, then
    global average pooling and a linear ``head``.

    Names are ``conv1, [bn1,] act1, ..., pool, flatten, head``; the BatchNorm variant has the
    plain one's parameters plus ``bn*``, as inserting BatchNorm into it would give.
    """
    layers: list[tuple[str, nn.Module]] = []
    in_channels = 1
    for i in range(1, depth + 1):
        layers.append((f"conv{i}", nn.Conv2d(in_channels, channels, 3, padding=1)))
        if batchnorm:
            layers.append((f"bn{i}", nn.BatchNorm2d(channels)))
        layers.append((f"act{i}", activation()))
        in_channels = channels
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("head", nn.Linear(channels, classes))]
    return nn.Sequential(OrderedDict(layers))


class BasicBlock(nn.Module):
    """ResNet basic block: ``act2(x + bn2(conv2(act1(bn1(conv1(x))))))``, shape-preserving."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act2(x + self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


class RecurrentClassifier(nn.Module):
    """One recurrent layer (``self.rnn``, batch first) read out from its last time step by ``head``.

    Per-time-step hidden states: ``self.rnn(x)[0]`` is ``(batch, time, hidden)``, but gradients
    taken with respect to that output tensor only see the *direct* path from each ``h_t`` to the
    loss — here zero for every ``t`` before the last — because the recurrence runs inside one
    fused op. Gradients *through time* need the states as separate graph nodes: see
    :func:`hidden_grad_norms_per_step`, or take the gradient with respect to the input sequence
    (``dL/dx_t`` includes every path through later steps).
    """

    def __init__(self, rnn: nn.RNNBase, classes: int):
        super().__init__()
        if not rnn.batch_first or rnn.bidirectional:
            raise ValueError("RecurrentClassifier needs a unidirectional, batch_first recurrent layer")
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, classes)

    def forward(self, x: Tensor) -> Tensor:
        outputs, _ = self.rnn(x)
        return self.head(outputs[:, -1])


class TinyTransformer(nn.Module):
    """Token and position embeddings, a pre-LayerNorm transformer encoder, mean pooling, ``head``."""

    def __init__(self, vocab: int, length: int, d_model: int, heads: int, layers: int, classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(length, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, activation=nn.GELU(),
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.encoder(self.embed(tokens) + self.pos(positions))
        return self.head(self.norm(x).mean(dim=1))


def hidden_grad_norms_per_step(case: ReferenceCase, batch: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``||dL/dh_t||`` for every time step ``t`` of a recurrent case: vanishing *through time*.

    Parameter gradients cannot show it (the recurrent weight's gradient is a sum over steps);
    the gradient with respect to each hidden state can. The sequence is re-run one step at a
    time with the state passed explicitly, so every ``h_t`` is a node of the graph and its
    gradient includes all paths through later steps. For an LSTM the state is ``(h_t, c_t)`` and
    both count. The model's ``.grad`` fields are left untouched.

    Args:
        case: a case whose model is a :class:`RecurrentClassifier`.
        batch: ``(inputs, targets)``. Default: ``case.batch(0)``.

    Returns:
        A float tensor of shape ``(time,)``: the norm over batch and hidden units at each step.

    Raises:
        TypeError: if the case's model is not a :class:`RecurrentClassifier` of a plain
            ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM``.
    """
    model = case.model
    if not isinstance(model, RecurrentClassifier):
        raise TypeError(f"{case.name!r} has a {type(model).__name__}, not a RecurrentClassifier")
    if type(model.rnn) not in (nn.RNN, nn.GRU, nn.LSTM):  # a subclass may not carry its state across calls
        raise TypeError(f"cannot re-run a {type(model.rnn).__name__} step by step; supported: RNN, GRU, LSTM")
    inputs, targets = case.batch(0) if batch is None else batch
    state: Tensor | tuple[Tensor, Tensor] | None = None
    states: list[Tensor] = []
    with torch.enable_grad():
        for t in range(inputs.shape[1]):
            _, state = model.rnn(inputs[:, t : t + 1], state)
            states.extend(state if isinstance(state, tuple) else (state,))
        last_hidden = states[-2] if isinstance(state, tuple) else states[-1]  # (layers, batch, hidden)
        loss = case.loss_fn(model.head(last_hidden[-1]), targets)
        grads = torch.autograd.grad(loss, states, allow_unused=True)  # an LSTM's last c_T is unused
    zero = loss.new_zeros(())
    per_state = torch.stack([zero if g is None else g.norm() for g in grads]).view(inputs.shape[1], -1)
    return per_state.norm(dim=1).detach()


def _init_linear(model: nn.Module, init: Callable[[nn.Module], None], names: Iterable[str]) -> None:
    with torch.no_grad():
        for name in names:
            init(model.get_submodule(name))


def _he(layer: nn.Module) -> None:
    """Kaiming-normal weights (fan-in, ReLU gain) and zero biases: unit variance through ReLUs."""
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _xavier(gain: float) -> Callable[[nn.Module], None]:
    def init(layer: nn.Module) -> None:
        nn.init.xavier_normal_(layer.weight, gain=gain)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)

    return init


def _sgd(lr: float, momentum: float = 0.9) -> OptimizerFactory:
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum)


def _adam(lr: float) -> OptimizerFactory:
    return functools.partial(torch.optim.Adam, lr=lr)


def _hidden(depth: int, prefix: str = "fc") -> list[str]:
    return [f"{prefix}{i}" for i in range(1, depth + 1)]


def _case(name: str, model: nn.Module, data: tuple[Tensor, Tensor], seed: int, **kwargs: object) -> ReferenceCase:
    inputs, targets = data
    return ReferenceCase(name=name, model=model, loss_fn=nn.functional.cross_entropy, inputs=inputs,
                         targets=targets, seed=seed, **kwargs)  # type: ignore[arg-type]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# 1. Deep sigmoid MLP: vanishing


SIGMOID_MLP_DEPTH = 10
SIGMOID_MLP_WIDTH = 64


@register_model
def sigmoid_mlp(seed: int = 0) -> ReferenceCase:
    """Vanishing: a 10-layer sigmoid MLP with default init (cure: swap_activation + he_init)."""
    model = mlp(16, SIGMOID_MLP_WIDTH, SIGMOID_MLP_DEPTH, 4, nn.Sigmoid)  # PyTorch default init
    return _case(
        "sigmoid_mlp", model, tasks.teacher_classification(_generator(seed)), seed,
        optimizer=_sgd(0.02), batch_size=64, default_steps=150,
        problem="vanishing", twin="sigmoid_mlp_fixed", cure=("swap_activation", "he_init"),
        description=(
            "Vanishing gradients in a deep sigmoid MLP (10 hidden Linear+Sigmoid layers, PyTorch "
            "default init, SGD). Backpropagation multiplies by sigmoid'(z) <= 0.25 and by a default-"
            "initialised weight matrix (gain ~0.6) at every layer, so the gradient shrinks ~7x per "
            "layer: the first layer's gradient is ~1e-9-1e-8 of the head's and the early layers never "
            "learn; the loss stays at chance. Cure: swap_activation (ReLU, derivative 1 where "
            "active) + he_init (Kaiming weights keep the signal's scale through ReLUs)."
        ),
    )


@register_model
def sigmoid_mlp_fixed(seed: int = 0) -> ReferenceCase:
    """Twin of ``sigmoid_mlp``: ReLU activations and Kaiming init."""
    model = mlp(16, SIGMOID_MLP_WIDTH, SIGMOID_MLP_DEPTH, 4, nn.ReLU)
    _init_linear(model, _he, _hidden(SIGMOID_MLP_DEPTH))
    return _case(
        "sigmoid_mlp_fixed", model, tasks.teacher_classification(_generator(seed)), seed,
        optimizer=_sgd(0.02), batch_size=64, default_steps=150,
        problem=None, twin="sigmoid_mlp", cure=("swap_activation", "he_init"),
        description=(
            "Fixed twin of sigmoid_mlp: same depth, width, data and optimizer, with ReLU activations "
            "and Kaiming-normal weights (zero biases), which is what swap_activation + he_init make "
            "of it. Gradients reach the first layer at a similar scale as the head."
        ),
    )


# ----------------------------------------------------------------------------------------------
# 2. Deep tanh MLP with a tiny initialisation: vanishing

TANH_DEPTH = 10
TANH_TINY_STD = 0.02


def _tiny(layer: nn.Module) -> None:
    nn.init.normal_(layer.weight, std=TANH_TINY_STD)
    nn.init.zeros_(layer.bias)


@register_model
def tanh_tiny_init(seed: int = 0) -> ReferenceCase:
    """Vanishing: a 10-layer tanh MLP initialised with std 0.02 (cure: he_init, i.e. Xavier for tanh)."""
    model = mlp(16, 32, TANH_DEPTH, 4, nn.Tanh)
    _init_linear(model, _tiny, _hidden(TANH_DEPTH))
    return _case(
        "tanh_tiny_init", model, tasks.teacher_classification(_generator(seed)), seed,
        optimizer=_sgd(0.02), batch_size=64, default_steps=150,
        problem="vanishing", twin="tanh_tiny_init_fixed", cure=("he_init",),
        description=(
            f"Vanishing gradients in a deep tanh MLP (10 hidden layers) whose weights start at "
            f"std {TANH_TINY_STD}. Around zero tanh is linear, so each layer scales both the forward "
            f"signal and the backward gradient by ~std*sqrt(width) ~ 0.1: the input is gone after "
            f"a few layers and the early layers' gradients (visible through their biases) are "
            f"~1e-8 of the late ones'. Weight-gradient norms alone look flat (each is a small "
            f"gradient times a small activation); the decay shows in per-layer norms including "
            f"biases and in activation gradients. Cure: he_init, which for tanh-fed layers means "
            f"Xavier init with gain 5/3, so the signal keeps its scale."
        ),
    )


@register_model
def tanh_tiny_init_fixed(seed: int = 0) -> ReferenceCase:
    """Twin of ``tanh_tiny_init``: Xavier init (gain 5/3), tanh kept."""
    model = mlp(16, 32, TANH_DEPTH, 4, nn.Tanh)
    _init_linear(model, _xavier(nn.init.calculate_gain("tanh")), _hidden(TANH_DEPTH))
    return _case(
        "tanh_tiny_init_fixed", model, tasks.teacher_classification(_generator(seed)), seed,
        optimizer=_sgd(0.02), batch_size=64, default_steps=150,
        problem=None, twin="tanh_tiny_init", cure=("he_init",),
        description=(
            "Fixed twin of tanh_tiny_init: the same tanh MLP with Xavier-normal weights (gain 5/3, "
            "zero biases), what he_init does to tanh-fed layers when the activation is kept."
        ),
    )


# ----------------------------------------------------------------------------------------------
# 3. Plain deep CNN without normalisation: vanishing

CNN_DEPTH = 10
CNN_CHANNELS = 8


@register_model
def plain_cnn(seed: int = 0) -> ReferenceCase:
    """Vanishing: a 10-conv sigmoid CNN without normalisation (cure: insert_batchnorm)."""
    model = plain_convnet(CNN_CHANNELS, CNN_DEPTH, 4, nn.Sigmoid)
    return _case(
        "plain_cnn", model, tasks.grating_images(_generator(seed)), seed,
        optimizer=_sgd(0.2), batch_size=32, default_steps=150,
        problem="vanishing", twin="plain_cnn_fixed", cure=("insert_batchnorm",),
        description=(
            "Vanishing gradients in a plain CNN: 10 3x3 convolutions with sigmoids and no "
            "normalisation (PyTorch default init) classifying the orientation of noisy 16x16 "
            "gratings. As in the sigmoid MLP, every layer multiplies the gradient by sigmoid' <= "
            "0.25 and a weight of gain < 1; the input-dependent part of the signal fades the same "
            "way forward. conv1's gradient is ~1e-9 of the head's; the loss stays at chance. "
            "Cure: insert_batchnorm after every convolution. BatchNorm rescales each layer's "
            "pre-activations to unit variance, which keeps the sigmoids in their sensitive range "
            "and, backwards, multiplies the gradient by 1/std of the (small) pre-activations, "
            "cancelling the per-layer shrinkage."
        ),
    )


@register_model
def plain_cnn_fixed(seed: int = 0) -> ReferenceCase:
    """Twin of ``plain_cnn``: a BatchNorm2d after every convolution."""
    model = plain_convnet(CNN_CHANNELS, CNN_DEPTH, 4, nn.Sigmoid, batchnorm=True)
    return _case(
        "plain_cnn_fixed", model, tasks.grating_images(_generator(seed)), seed,
        optimizer=_sgd(0.2), batch_size=32, default_steps=150,
        problem=None, twin="plain_cnn", cure=("insert_batchnorm",),
        description=(
            "Fixed twin of plain_cnn: the same convolutions and sigmoids with a BatchNorm2d after "
            "every convolution (conv{i} -> bn{i} -> act{i}), what insert_batchnorm makes of it."
        ),
    )


# ----------------------------------------------------------------------------------------------
# 4. Vanilla RNN on a long-range task: vanishing through time

RNN_HIDDEN = 32
RNN_LENGTH = 50
GRU_UPDATE_BIAS = 3.0


@register_model
def vanilla_rnn(seed: int = 0) -> ReferenceCase:
    """Vanishing through time: a tanh ``nn.RNN`` on a 50-step recall task (cure: lstm_gru)."""
    model = RecurrentClassifier(nn.RNN(1, RNN_HIDDEN, batch_first=True), 2)
    return _case(
        "vanilla_rnn", model, tasks.first_token_sequences(_generator(seed), length=RNN_LENGTH), seed,
        optimizer=_adam(3e-3), batch_size=64, default_steps=200,
        problem="vanishing", twin="vanilla_rnn_fixed", cure=("lstm_gru",),
        description=(
            f"Vanishing gradients through time in a tanh nn.RNN (hidden {RNN_HIDDEN}, default "
            f"init) that must report the sign written at t=0 of a {RNN_LENGTH}-step noisy sequence. "
            f"The gradient reaching h_t is multiplied at every step back by W_hh^T diag(1 - h^2), "
            f"whose gain is < 1, so ||dL/dh_0|| is ~1e-11 of ||dL/dh_T||: the weights never learn "
            f"to keep the first token and the loss stays at chance. Parameter gradients do not "
            f"show it (weight_hh's gradient is a sum over steps): use hidden_grad_norms_per_step(). "
            f"Cure: lstm_gru, a gated cell whose state is carried additively; its gate starts "
            f"biased towards keeping the state, the usual initialisation for gated cells."
        ),
    )


@register_model
def vanilla_rnn_fixed(seed: int = 0) -> ReferenceCase:
    """Twin of ``vanilla_rnn``: an ``nn.GRU`` of the same sizes, update gate biased to keep."""
    gru = nn.GRU(1, RNN_HIDDEN, batch_first=True)
    with torch.no_grad():  # gates are ordered (reset, update, new): bias the update gate to keep
        gru.bias_ih_l0[RNN_HIDDEN : 2 * RNN_HIDDEN].fill_(GRU_UPDATE_BIAS)
        gru.bias_hh_l0[RNN_HIDDEN : 2 * RNN_HIDDEN].zero_()
    model = RecurrentClassifier(gru, 2)
    return _case(
        "vanilla_rnn_fixed", model, tasks.first_token_sequences(_generator(seed), length=RNN_LENGTH), seed,
        optimizer=_adam(3e-3), batch_size=64, default_steps=200,
        problem=None, twin="vanilla_rnn", cure=("lstm_gru",),
        description=(
            f"Fixed twin of vanilla_rnn: an nn.GRU of the same sizes. Its state update is "
            f"h_t = (1 - z) * n + z * h_(t-1); the update gate's bias starts at {GRU_UPDATE_BIAS} "
            f"(z ~ 0.95), so the state, and the gradient, survive ~20 steps at initialisation and "
            f"training can open the path to t=0 (the analogue of an LSTM's forget-gate bias)."
        ),
    )


# ----------------------------------------------------------------------------------------------
# 5. RNN with over-scaled recurrent weights: exploding

EXPLODING_GAIN = 2.5
EXPLODING_CLIP = 1.0
EXPLODING_LENGTH = 50
EXPLODING_LR = 0.1


def _exploding_rnn_model() -> RecurrentClassifier:
    rnn = nn.RNN(4, RNN_HIDDEN, batch_first=True)
    with torch.no_grad():  # a random matrix with entries N(0, g^2/H) has spectral radius ~g
        nn.init.normal_(rnn.weight_hh_l0, std=EXPLODING_GAIN / math.sqrt(RNN_HIDDEN))
    return RecurrentClassifier(rnn, 4)


def _exploding_rnn_case(name: str, seed: int, clip: float | None, **kwargs: object) -> ReferenceCase:
    data = tasks.recent_token_sequences(_generator(seed), length=EXPLODING_LENGTH, lag=1)
    return _case(name, _exploding_rnn_model(), data, seed, optimizer=_sgd(EXPLODING_LR), batch_size=64,
                 default_steps=200, cure=("clip_gradients",), clip_grad_norm=clip, **kwargs)


@register_model
def exploding_rnn(seed: int = 0) -> ReferenceCase:
    """Exploding: a tanh ``nn.RNN`` with recurrent gain 2.5, trained with SGD (cure: clip_gradients)."""
    return _exploding_rnn_case(
        "exploding_rnn", seed, None, problem="exploding", twin="exploding_rnn_fixed",
        description=(
            f"Exploding gradients in a tanh nn.RNN (hidden {RNN_HIDDEN}) whose recurrent weights are "
            f"drawn N(0, g^2/hidden) with gain g = {EXPLODING_GAIN} (spectral radius ~g), trained "
            f"with SGD on a short-memory task: name the token one step before the last of a "
            f"{EXPLODING_LENGTH}-step sequence. With a gain above 1 the dynamics are chaotic and the "
            f"gradient grows at every step back in time (||dL/dh_0|| ~1e4-1e5 x ||dL/dh_T||); the "
            f"recurrent layer's gradient is hundreds of times its weights' norm, so the first SGD "
            f"updates throw the weights so far that the tanh units saturate for good and the loss "
            f"ends near or above chance. The explosion is visible in the first few steps; after the "
            f"wreck the saturated layer passes almost no gradient. Cure: clip_gradients (global "
            f"norm {EXPLODING_CLIP}): every update stays bounded, training shrinks the recurrent "
            f"gain, and the raw gradients calm down within a few dozen steps. (Clipping caps large "
            f"gradients; it never lifts vanishing ones.)"
        ),
    )


@register_model
def exploding_rnn_fixed(seed: int = 0) -> ReferenceCase:
    """Twin of ``exploding_rnn``: the same model trained with gradient-norm clipping."""
    return _exploding_rnn_case(
        "exploding_rnn_fixed", seed, EXPLODING_CLIP, problem=None, twin="exploding_rnn",
        description=(
            f"Fixed twin of exploding_rnn: the same model, data and optimizer, trained with the "
            f"global gradient norm clipped to {EXPLODING_CLIP} (case.clip_grad_norm; train() clips "
            f"after on_backward, so observers see the unclipped gradients)."
        ),
    )


# ----------------------------------------------------------------------------------------------
# 6. Deep ReLU MLP with over-scaled weights, trained with Adam: exploding

OVERSCALED_DEPTH = 8
OVERSCALE = 3.0


def _overscaled_relu_mlp(name: str, seed: int, scale: float, **kwargs: object) -> ReferenceCase:
    model = mlp(16, 64, OVERSCALED_DEPTH, 4, nn.ReLU)
    names = _hidden(OVERSCALED_DEPTH)
    _init_linear(model, _he, names)
    with torch.no_grad():
        for layer in names:
            model.get_submodule(layer).weight.mul_(scale)
    return _case(name, model, tasks.teacher_classification(_generator(seed)), seed, optimizer=_adam(1e-3),
                 batch_size=64, default_steps=150, cure=("he_init",), **kwargs)


@register_model
def overscaled_relu_mlp(seed: int = 0) -> ReferenceCase:
    """Exploding: an 8-layer ReLU MLP at 3x He scale, trained with Adam (cure: he_init)."""
    return _overscaled_relu_mlp(
        "overscaled_relu_mlp", seed, OVERSCALE, problem="exploding", twin="overscaled_relu_mlp_fixed",
        description=(
            f"Exploding gradients in a deep ReLU MLP ({OVERSCALED_DEPTH} hidden layers) whose "
            f"weights are {OVERSCALE:g}x the He scale, trained with Adam. ReLU is positively "
            f"homogeneous, so the forward signal grows {OVERSCALE:g}x per layer (logits ~1e3-1e4) "
            f"and so does the gradient going back; each weight gradient is the product of the two, "
            f"so it is huge (10-60x the weight's norm in every hidden layer, ~1e4x in the head) but "
            f"roughly flat across depth: "
            f"a growth-across-depth rule misses it. The loss is in the tens to hundreds. Clipping "
            f"is no cure: Adam divides each gradient by its own running scale, so its updates are "
            f"~lr in size whatever the gradient's, and 1e-3 per step cannot undo a {OVERSCALE:g}x "
            f"scale in {OVERSCALED_DEPTH} layers within a few hundred steps (clipped to norm 1, the "
            f"loss still ends in the tens). Cure: he_init (Kaiming weights, zero biases)."
        ),
    )


@register_model
def overscaled_relu_mlp_fixed(seed: int = 0) -> ReferenceCase:
    """Twin of ``overscaled_relu_mlp``: He init."""
    return _overscaled_relu_mlp(
        "overscaled_relu_mlp_fixed", seed, 1.0, problem=None, twin="overscaled_relu_mlp",
        description=(
            "Fixed twin of overscaled_relu_mlp: the same MLP, data and Adam optimizer with "
            "Kaiming-normal weights (zero biases), what he_init makes of it."
        ),
    )


# ----------------------------------------------------------------------------------------------
# 7. ReLU MLP with dead units

DEAD_BIAS = -4.0


def _relu_mlp(name: str, seed: int, depth: int, first_bias: float, **kwargs: object) -> ReferenceCase:
    model = mlp(16, 64, depth, 4, nn.ReLU)
    _init_linear(model, _he, _hidden(depth))
    with torch.no_grad():
        model.get_submodule("fc1").bias.fill_(first_bias)
    return _case(name, model, tasks.teacher_classification(_generator(seed)), seed, optimizer=_sgd(0.02),
                 batch_size=64, default_steps=150, **kwargs)


@register_model
def dead_relu_mlp(seed: int = 0) -> ReferenceCase:
    """Dead units: a ReLU MLP whose first layer has biases of -4 (cure: he_init)."""
    return _relu_mlp(
        "dead_relu_mlp", seed, 3, DEAD_BIAS, problem="dead_units", twin="dead_relu_mlp_fixed", cure=("he_init",),
        description=(
            f"Dead ReLU units: a 3-hidden-layer ReLU MLP (Kaiming weights) whose first layer's "
            f"biases are {DEAD_BIAS:g}, as a too-large learning-rate step can leave them. Its "
            f"pre-activations have std ~1.4, so ~85% of fc1's units are negative for every example "
            f"of a batch: they output 0, pass no gradient, and cannot recover. The few live units "
            f"fire rarely, so the network starves and the loss stays near chance. Cure: he_init "
            f"of the dead layer (Kaiming weights, zero biases); LeakyReLU would also keep a "
            f"gradient alive, but a 0.01 slope under a -4 bias recovers slowly."
        ),
    )


@register_model
def dead_relu_mlp_fixed(seed: int = 0) -> ReferenceCase:
    """Twin of ``dead_relu_mlp``: the same weights, biases zeroed."""
    return _relu_mlp(
        "dead_relu_mlp_fixed", seed, 3, 0.0, problem=None, twin="dead_relu_mlp", cure=("he_init",),
        description=(
            "Fixed twin of dead_relu_mlp: the same weights with fc1's biases zeroed "
            "(Kaiming-initialised as he_init leaves it): about half of each unit's inputs activate it."
        ),
    )


@register_model
def shallow_relu_mlp(seed: int = 0) -> ReferenceCase:
    """Healthy control: a 2-hidden-layer ReLU MLP with He init."""
    return _relu_mlp(
        "shallow_relu_mlp", seed, 2, 0.0, problem=None, twin=None, cure=(),
        description=(
            "Healthy control: a 2-hidden-layer ReLU MLP with Kaiming init and SGD. Shallow and "
            "well scaled: no problem to find."
        ),
    )


# ----------------------------------------------------------------------------------------------
# 8. Sigmoid network with large weights: saturation

SATURATED_GAIN = 30.0


def _sigmoid_net(name: str, seed: int, gain: float, **kwargs: object) -> ReferenceCase:
    model = mlp(16, 32, 1, 4, nn.Sigmoid)
    _init_linear(model, _xavier(gain), ["fc1"])
    return _case(name, model, tasks.teacher_classification(_generator(seed)), seed, optimizer=_sgd(0.1),
                 batch_size=64, default_steps=150, cure=("he_init",), **kwargs)


@register_model
def saturated_sigmoid(seed: int = 0) -> ReferenceCase:
    """Saturation: a sigmoid MLP with weights 30x the Xavier scale (cure: he_init, i.e. Xavier)."""
    return _sigmoid_net(
        "saturated_sigmoid", seed, SATURATED_GAIN, problem="saturation", twin="saturated_sigmoid_fixed",
        description=(
            f"Saturated sigmoids: a sigmoid MLP with one hidden layer whose weights are "
            f"{SATURATED_GAIN:g}x the Xavier scale. Pre-activations have std ~25, so over 80% of "
            f"sigmoid outputs are within 0.01 of 0 or 1, where sigmoid' < 0.01: those units are "
            f"stuck, the hidden layer acts as fixed random binary features and the loss stays far "
            f"above the twin's. Deliberately shallow (fc1 and head), so there is no depth for a "
            f"gradient to vanish across: the problem is the saturation itself. Cure: he_init, "
            f"which for a sigmoid-fed layer means Xavier init (gain 1, zero biases); swapping to "
            f"ReLU alone would leave the weights {SATURATED_GAIN:g}x too large."
        ),
    )


@register_model
def saturated_sigmoid_fixed(seed: int = 0) -> ReferenceCase:
    """Twin of ``saturated_sigmoid``: Xavier init."""
    return _sigmoid_net(
        "saturated_sigmoid_fixed", seed, 1.0, problem=None, twin="saturated_sigmoid",
        description=(
            "Fixed twin of saturated_sigmoid: the same sigmoid MLP with Xavier-normal weights "
            "(zero biases), what he_init does to a sigmoid-fed layer: pre-activations of std ~0.7, "
            "no unit saturated."
        ),
    )


# ----------------------------------------------------------------------------------------------
# 9. Healthy controls


# ----------------------------------------------------------------------------------------------
# Gradient spikes: one corrupt batch per epoch


SPIKE_BAD_BATCH = 100  # of 128 per epoch: the spikes hit steps 100 and 228 of the 240


def _spike_case(name: str, seed: int, clip: float | None, **kwargs: object) -> ReferenceCase:
    g = _generator(seed)
    inputs = torch.randn(4096, 16, generator=g)
    targets = torch.tanh(inputs @ torch.randn(16, 4, generator=g) / 4)
    bad = slice(SPIKE_BAD_BATCH * 32, (SPIKE_BAD_BATCH + 1) * 32)
    targets[bad] *= 30.0  # mislabelled by a unit error upstream: every residual is 30x
    return ReferenceCase(name=name, model=mlp(16, 64, 3, 4, nn.Tanh), loss_fn=nn.functional.mse_loss, inputs=inputs,
                         targets=targets, seed=seed, optimizer=_sgd(0.05), batch_size=32, default_steps=240,
                         clip_grad_norm=clip, **kwargs)  # type: ignore[arg-type]


@register_model
def spike_mlp(seed: int = 0) -> ReferenceCase:
    """Gradient spike: one corrupt batch per epoch knocks a healthy tanh regressor off course."""
    return _spike_case(
        "spike_mlp", seed, None, problem="spike", twin="spike_mlp_fixed", cure=("clip_gradients",),
        description=(
            "Gradient spike: a healthy 3-layer tanh MLP regressing a smooth teacher with SGD (lr 0.05, momentum "
            "0.9), except that one batch per epoch has targets 30x too large. On that step every layer's "
            "gradient norm jumps far above its own recent history and the update throws the model off; the "
            "loss is still high 10 steps later. clip_gradients at the run's own robust bound caps the spike."
        ),
    )


@register_model
def spike_mlp_fixed(seed: int = 0) -> ReferenceCase:
    """Fixed twin of ``spike_mlp``: global-norm clipping at 0.3 (about 1.4x the typical norm)."""
    return _spike_case(
        "spike_mlp_fixed", seed, 0.3, problem=None, twin="spike_mlp", cure=("clip_gradients",),
        description="spike_mlp with global gradient-norm clipping at 0.3: the corrupt batch moves the weights no further than a normal one.",
    )


@register_model
def resnet_bn(seed: int = 0) -> ReferenceCase:
    """Healthy control: a small ResNet with BatchNorm and Kaiming init."""
    channels = 16
    model = nn.Sequential(OrderedDict([
        ("stem", nn.Conv2d(1, channels, 3, padding=1, bias=False)),
        ("stem_bn", nn.BatchNorm2d(channels)),
        ("stem_act", nn.ReLU()),
        ("block1", BasicBlock(channels)),
        ("block2", BasicBlock(channels)),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("head", nn.Linear(channels, 4)),
    ]))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return _case(
        "resnet_bn", model, tasks.grating_images(_generator(seed)), seed,
        optimizer=_sgd(0.05), batch_size=32, default_steps=60, problem=None, twin=None, cure=(),
        description=(
            "Healthy control: a small ResNet (stem + 2 basic blocks, 16 channels) with BatchNorm and "
            "Kaiming init, on the grating images. Identity shortcuts and normalisation keep "
            "gradients at a similar scale in every layer."
        ),
    )


@register_model
def transformer_preln(seed: int = 0) -> ReferenceCase:
    """Healthy control: a 2-layer pre-LayerNorm transformer encoder."""
    length, vocab = 16, 4
    model = TinyTransformer(vocab, length, d_model=32, heads=4, layers=2, classes=vocab)
    return _case(
        "transformer_preln", model, tasks.majority_token_sequences(_generator(seed), length=length, vocab=vocab),
        seed, optimizer=_adam(3e-3), batch_size=64, default_steps=100, problem=None, twin=None, cure=(),
        description=(
            "Healthy control: a 2-layer pre-LayerNorm transformer encoder (d_model 32, 4 heads, GELU) "
            "naming the most frequent token of a 16-token sequence. Pre-LN keeps an identity path "
            "from the loss to every layer, so gradients neither vanish nor explode."
        ),
    )


# ----------------------------------------------------------------------------------------------
# 8-10. Causes that compound across depth (issue 15): no single layer far off, the product is

COMPOUND_DEPTH = 30
COMPOUND_WIDTH = 256


def _compound_init_mlp(name: str, seed: int, variance: float, **kwargs: object) -> ReferenceCase:
    model = mlp(16, COMPOUND_WIDTH, COMPOUND_DEPTH, 4, nn.ReLU)
    with torch.no_grad():
        for layer in _hidden(COMPOUND_DEPTH):
            module = model.get_submodule(layer)
            nn.init.normal_(module.weight, std=math.sqrt(variance / module.in_features))
            nn.init.zeros_(module.bias)
    return _case(name, model, tasks.teacher_classification(_generator(seed)), seed, optimizer=_sgd(0.005),
                 batch_size=64, default_steps=200, cure=("he_init",), **kwargs)


@register_model
def compound_init_mlp(seed: int = 0) -> ReferenceCase:
    """Vanishing: a 30-layer ReLU MLP at LeCun scale, 0.71x He per layer (cure: he_init)."""
    return _compound_init_mlp(
        "compound_init_mlp", seed, 1.0, problem="vanishing", twin="compound_init_mlp_fixed",
        description=(
            f"A compound under-initialisation: a plain ReLU MLP ({COMPOUND_DEPTH} hidden layers, width "
            f"{COMPOUND_WIDTH}) with LeCun-scale weights, std = sqrt(1/fan_in), trained with SGD and "
            f"momentum. Each layer is only 0.71x the He scale, yet a ReLU halves the variance it is "
            f"given, so every layer multiplies the signal's variance by 1/2: 2^-{COMPOUND_DEPTH} over the "
            f"depth, forward and backward. The loss stays at chance. No normalisation or skip is "
            f"missing: re-initialising at He scale alone makes the network train (He et al. 2015). "
            f"Cure: he_init."
        ),
    )


@register_model
def compound_init_mlp_fixed(seed: int = 0) -> ReferenceCase:
    """Twin of ``compound_init_mlp``: the hidden layers at He scale."""
    return _compound_init_mlp(
        "compound_init_mlp_fixed", seed, 2.0, problem=None, twin="compound_init_mlp",
        description="Fixed twin of compound_init_mlp: the same MLP with Kaiming-normal hidden layers (zero biases).",
    )


class ResidualMLPBlock(nn.Module):
    """``x + fc2(act(fc1(x)))``, no normalisation: the branch of a Fixup/SkipInit-style residual MLP."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


RESIDUAL_BLOCKS = 16
RESIDUAL_WIDTH = 64


def _residual_mlp(name: str, seed: int, zero_last: bool, **kwargs: object) -> ReferenceCase:
    blocks = [ResidualMLPBlock(RESIDUAL_WIDTH) for _ in range(RESIDUAL_BLOCKS)]
    model = nn.Sequential(OrderedDict(
        [("proj", nn.Linear(16, RESIDUAL_WIDTH))] + [(f"block{i + 1}", b) for i, b in enumerate(blocks)]
        + [("head", nn.Linear(RESIDUAL_WIDTH, 4))]))
    with torch.no_grad():
        for block in blocks:
            _he(block.fc1)
            _he(block.fc2)
            if zero_last:
                nn.init.zeros_(block.fc2.weight)
    return _case(name, model, tasks.teacher_classification(_generator(seed)), seed, optimizer=_adam(1e-3),
                 batch_size=64, default_steps=150, cure=("rescale_residual",), **kwargs)


@register_model
def residual_mlp(seed: int = 0) -> ReferenceCase:
    """Exploding: 16 un-normalised residual blocks with He-scale branches (cure: rescale_residual)."""
    return _residual_mlp(
        "residual_mlp", seed, False, problem="exploding", twin="residual_mlp_fixed",
        description=(
            f"A forward signal that multiplies through residual additions: {RESIDUAL_BLOCKS} blocks "
            f"x + fc2(relu(fc1(x))) (width {RESIDUAL_WIDTH}), no normalisation, both branch layers at He "
            f"scale, trained with Adam. Each block adds a branch as large as twice the stream to it, so "
            f"the stream's variance triples per block (3^{RESIDUAL_BLOCKS} over the stack): logits in the "
            f"thousands, a loss in the thousands at the start and still several times chance at the end "
            f"(with SGD the first step overflows). Every layer is at its textbook scale: he_init cannot "
            f"help. Cure: rescale_residual, zero-initialising the last layer of each branch so every block "
            f"starts as the identity (SkipInit, Fixup)."
        ),
    )


@register_model
def residual_mlp_fixed(seed: int = 0) -> ReferenceCase:
    """Twin of ``residual_mlp``: the last layer of each branch zero-initialised."""
    return _residual_mlp(
        "residual_mlp_fixed", seed, True, problem=None, twin="residual_mlp",
        description="Fixed twin of residual_mlp: fc2 of every block zero-initialised (each block starts as the identity).",
    )


RECURRENT_ADAM_GAIN = 2.5


def _recurrent_adam(name: str, seed: int, orthogonal: bool, **kwargs: object) -> ReferenceCase:
    rnn = nn.RNN(4, RNN_HIDDEN, batch_first=True)
    with torch.no_grad():
        if orthogonal:
            nn.init.orthogonal_(rnn.weight_hh_l0)
        else:  # entries N(0, g^2/H): spectral radius ~g
            nn.init.normal_(rnn.weight_hh_l0, std=RECURRENT_ADAM_GAIN / math.sqrt(RNN_HIDDEN))
    data = tasks.recent_token_sequences(_generator(seed), length=EXPLODING_LENGTH, lag=1)
    return _case(name, RecurrentClassifier(rnn, 4), data, seed, optimizer=_adam(3e-3), batch_size=64,
                 default_steps=200, cure=("recurrent_init",), **kwargs)


@register_model
def recurrent_adam(seed: int = 0) -> ReferenceCase:
    """Exploding: a tanh ``nn.RNN`` with recurrent gain 2.5, trained with Adam (cure: recurrent_init)."""
    return _recurrent_adam(
        "recurrent_adam", seed, False, problem="exploding", twin="recurrent_adam_fixed",
        description=(
            f"exploding_rnn's over-scaled recurrence (spectral radius ~{RECURRENT_ADAM_GAIN}) under Adam. "
            f"Adam divides each gradient by its running scale, so clipping changes nothing (measured: "
            f"the loss ends higher with it): the recurrent matrix stays chaotic and the loss stays near "
            f"chance. Cure: recurrent_init, an orthogonal W_hh (spectral radius 1; Saxe et al. 2014)."
        ),
    )


@register_model
def recurrent_adam_fixed(seed: int = 0) -> ReferenceCase:
    """Twin of ``recurrent_adam``: an orthogonal recurrent matrix."""
    return _recurrent_adam(
        "recurrent_adam_fixed", seed, True, problem=None, twin="recurrent_adam",
        description="Fixed twin of recurrent_adam: the same RNN with an orthogonal W_hh, trained with Adam.",
    )
