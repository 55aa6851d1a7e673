"""Causes that compound across depth (gradwatch.causes), on real models trained a few dozen steps.

Problems: the compound gain names the cause and ranks its fix first; the fix repairs training.
Healthy models that would trap a naive rule (a pre-LN transformer's residual stream, a GPT-2
config at its own std-0.02 init, deep He/Xavier stacks, a hidden functional normalisation) stay
free of these causes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import causes, models, tasks
from gradwatch.findings import Diagnosis
from gradwatch.layers import activation_kind


def _train(model: nn.Module, opt: torch.optim.Optimizer, data: tuple[torch.Tensor, torch.Tensor], steps: int,
           watch: bool = True, batch: int = 64) -> tuple[Diagnosis | None, list[float]]:
    x, y = data
    losses: list[float] = []
    watcher = gradwatch.watch(model, optimizer=opt) if watch else None
    try:
        for step in range(steps):
            i = (step * batch) % (len(x) - batch + 1)
            loss = nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
            loss.backward()
            if watcher is not None:
                watcher.step(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return (watcher.diagnose() if watcher is not None else None), losses
    finally:
        if watcher is not None:
            watcher.close()


def _no_compound_cause(diag: Diagnosis) -> None:
    for f in diag.findings:
        assert "compound_init" not in f.evidence and "residual_growth" not in f.evidence, str(diag)
        assert "rescale_residual" not in f.fixes, str(diag)


def _mlp(depth: int, width: int, act: type[nn.Module], std_gain: float, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = models.mlp(16, width, depth, 4, act)
    with torch.no_grad():
        for name in [f"fc{i}" for i in range(1, depth + 1)]:
            layer = model.get_submodule(name)
            nn.init.normal_(layer.weight, std=std_gain / math.sqrt(layer.in_features))
            nn.init.zeros_(layer.bias)
    return model


# -- the numbers the rules use --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(k for k, v in causes.ACTIVATION_MEAN_SQUARE.items() if v is not None))
def test_activation_mean_square_factors_match_sampling(name):
    module = getattr(nn, name)()
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        y = module.double()(z[:, None])[:, 0] if name == "PReLU" else module.double()(z)
    measured = float(y.square().mean())
    if activation_kind(module) in ("tanh", "hard"):
        # tanh-like: 1 is the value near 0 (where a decaying signal lives), an upper bound at unit scale
        assert measured < causes.ACTIVATION_MEAN_SQUARE[name] == 1.0
        small = module.double()(1e-3 * z)
        assert float(small.square().mean()) / 1e-6 == pytest.approx(1.0, rel=1e-2)
    else:
        assert measured == pytest.approx(causes.ACTIVATION_MEAN_SQUARE[name], abs=0.01 if name == "RReLU" else 0.005)


# -- compound under-initialisation -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_compound_under_init_is_named_and_he_init_ranked_first(seed):
    model = _mlp(30, 128, nn.ReLU, 1.0, seed)  # LeCun scale: 0.71x He per layer, variance x1/2 per layer
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    diag, losses = _train(model, opt, tasks.teacher_classification(torch.Generator().manual_seed(seed)), 60)
    vanishing = diag.by_kind("vanishing")
    assert vanishing, str(diag)
    f = vanishing[0]
    assert f.fixes[0] == "he_init", str(diag)
    info = f.evidence["compound_init"]
    assert info["median_link_variance_gain"] == pytest.approx(0.5, rel=0.05)  # 0.71^2 x 2 x 1/2
    assert info["predicted_decades"] == pytest.approx(0.5 * 30 * math.log10(2), rel=0.05)
    assert len(f.evidence["fix_layers"]) == 30 and "head" not in f.evidence["fix_layers"]
    assert f.severity == "critical"  # the loss has not moved: training is blocked
    assert not diag.by_kind("dead_units")  # a symptom of the decay, folded into it


@pytest.mark.slow
def test_the_first_fix_repairs_the_compound_under_init_without_the_watcher():
    data = tasks.teacher_classification(torch.Generator().manual_seed(0))
    model = _mlp(30, 128, nn.ReLU, 1.0, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    diag, _ = _train(model, opt, data, 60)
    _, before = _train(model, opt, data, 120, watch=False)
    fixed = _mlp(30, 128, nn.ReLU, 1.0, 0)
    opt = torch.optim.SGD(fixed.parameters(), lr=0.01, momentum=0.9)
    report = gradwatch.apply_fixes(fixed, diag, optimizer=opt)
    assert [c.fix for c in report.applied] == ["he_init"], str(report)
    _, after = _train(fixed, opt, data, 180, watch=False)
    assert models.final_loss(after) < 0.75 * models.final_loss(before)
    assert models.final_loss(before) > 0.95 * math.log(4)  # stuck at chance without the fix


# -- healthy models: no compound cause --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_deep_relu_mlp_at_he_init_is_healthy(seed):
    model = _mlp(30, 256, nn.ReLU, math.sqrt(2.0), seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    diag, _ = _train(model, opt, tasks.teacher_classification(torch.Generator().manual_seed(seed)), 60)
    assert diag.healthy, str(diag)


@pytest.mark.slow
def test_tanh_mlp_at_xavier_init_has_no_compound_cause():
    torch.manual_seed(0)
    model = models.mlp(16, 128, 20, 4, nn.Tanh)
    with torch.no_grad():
        for name in [f"fc{i}" for i in range(1, 21)]:
            nn.init.xavier_normal_(model.get_submodule(name).weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    diag, _ = _train(model, opt, tasks.teacher_classification(torch.Generator().manual_seed(0)), 60)
    _no_compound_cause(diag)
    assert not diag.by_kind("exploding"), str(diag)


class _HiddenNormMLP(nn.Module):
    """LeCun-scale ReLU layers with a *functional* layer norm after each: invisible to the layer list,
    so the weights alone predict a compound decay that the measured signal contradicts."""

    def __init__(self, depth: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16 if i == 0 else width, width) for i in range(depth))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(depth))
        self.head = nn.Linear(width, 4)
        with torch.no_grad():
            for layer in self.layers:
                nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features))
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, act in zip(self.layers, self.acts, strict=True):
            x = act(nn.functional.layer_norm(layer(x), (layer.out_features,)))
        return self.head(x)


@pytest.mark.slow
def test_a_hidden_normalisation_contradicts_the_weights_and_nothing_compound_is_claimed():
    torch.manual_seed(0)
    model = _HiddenNormMLP(30, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    diag, _ = _train(model, opt, tasks.teacher_classification(torch.Generator().manual_seed(0)), 40)
    _no_compound_cause(diag)


class _PreLNTransformer(nn.Module):
    def __init__(self, layers: int, d_model: int = 64):
        super().__init__()
        self.embed = nn.Embedding(8, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0, activation=nn.GELU(),
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(tokens))).mean(dim=1))


@pytest.mark.slow
def test_deep_preln_transformer_residual_stream_growth_is_healthy():
    torch.manual_seed(0)
    model = _PreLNTransformer(12)
    data = tasks.majority_token_sequences(torch.Generator().manual_seed(0), length=16, vocab=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    diag, _ = _train(model, opt, data, 30)
    _no_compound_cause(diag)
    assert diag.healthy, str(diag)


def _hf_model(name: str, transformers):  # noqa: ANN001, ANN202 - transformers is an optional import
    small = {"vocab_size": 256, "num_attention_heads": 4, "max_position_embeddings": 64}
    if name == "gpt2":  # std 0.02: below He scale per layer, normalised by LayerNorm
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=6, n_embd=128, n_head=4, vocab_size=256,
                                                                    n_positions=64))
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=128, intermediate_size=256,
                                                                      num_hidden_layers=6, num_key_value_heads=4, **small))
    return transformers.BertForMaskedLM(transformers.BertConfig(hidden_size=128, intermediate_size=256,
                                                                num_hidden_layers=6, **small))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_hugging_face_configs_at_their_own_init_stay_healthy(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _hf_model(name, transformers)
    tokens = torch.randint(0, 256, (256, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, optimizer=opt) as watcher:
        for step in range(20):
            batch = tokens[(step * 16) % 256:][:16]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            watcher.step(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
        diag = watcher.diagnose()
    _no_compound_cause(diag)
    assert diag.healthy, str(diag)


@pytest.mark.slow
def test_resnet_with_batchnorm_has_no_residual_growth():
    case = models.create("resnet_bn", seed=0)
    opt = case.make_optimizer()
    with gradwatch.watch(case.model, optimizer=opt) as watcher:
        models.train(case, 30, optimizer=opt, on_backward=lambda s: None)
        diag = watcher.diagnose()
    _no_compound_cause(diag)


# -- residual growth under SGD: non-finite from the first steps -------------------------------------
def _residual_stack(blocks: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), *[models.ResidualMLPBlock(64) for _ in range(blocks)], nn.Linear(64, 4))
    with torch.no_grad():
        for block in model[1:-1]:
            for layer in (block.fc1, block.fc2):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_residual_growth_is_named_on_the_nonfinite_finding_and_rescaling_repairs_it(seed):
    data = tasks.teacher_classification(torch.Generator().manual_seed(seed))
    model = _residual_stack(32, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    diag, losses = _train(model, opt, data, 20)
    assert not math.isfinite(losses[-1])
    nonfinite, exploding = diag.by_kind("nonfinite"), diag.by_kind("exploding")
    assert nonfinite and exploding, str(diag)
    for f in (nonfinite[0], exploding[0]):
        assert f.fixes[0] == "rescale_residual", str(diag)
        assert "residual additions" in f.evidence["cause"]
    branches = exploding[0].evidence["residual_growth"]["branch_last_layers"]
    assert set(branches) <= {f"{i}.fc2" for i in range(1, 33)} and len(branches) >= 28

    fixed = _residual_stack(32, seed)
    opt = torch.optim.SGD(fixed.parameters(), lr=0.01, momentum=0.9)
    report = gradwatch.apply_fixes(fixed, diag, optimizer=opt, only=["rescale_residual"])
    assert [c.fix for c in report.applied] == ["rescale_residual"]
    assert all(fixed[i].fc2.weight.abs().max() == 0 for i in range(1, 33) if f"{i}.fc2" in branches)
    _, after = _train(fixed, opt, data, 100, watch=False)
    assert all(math.isfinite(v) for v in after) and models.final_loss(after) < 0.5 * math.log(4)


def test_rescale_residual_never_guesses_its_targets():
    model = _residual_stack(2, 0)
    finding = gradwatch.Finding("exploding", ("1.fc2", "2.fc2"), "critical", "no measured additions",
                                fixes=("rescale_residual",))
    report = gradwatch.apply_fixes(model, Diagnosis(findings=(finding,)), only=["rescale_residual"])
    assert [c.status for c in report.changes] == ["refused"] and "names no residual branch" in report.changes[0].reason
    assert all(model[i].fc2.weight.abs().max() > 0 for i in (1, 2))


# -- recurrent over-scaling under Adam ----------------------------------------------------------------
def test_recurrent_init_refuses_a_recurrence_that_is_not_over_scaled():
    torch.manual_seed(0)
    model = models.RecurrentClassifier(nn.RNN(4, 16, batch_first=True), 4)
    with torch.no_grad():
        nn.init.orthogonal_(model.rnn.weight_hh_l0, gain=0.9)
    finding = gradwatch.Finding("exploding", ("rnn",), "critical", "e", fixes=("recurrent_init", "lstm_gru"))
    report = gradwatch.apply_fixes(model, Diagnosis(findings=(finding,)), only=["recurrent_init"])
    assert [c.status for c in report.changes] == ["refused"]
    assert "not over-scaled" in report.changes[0].refused["rnn"]


@pytest.mark.slow
def test_over_scaled_recurrence_under_adam_gets_no_clipping_even_from_auto_fix():
    case = models.create("recurrent_adam", seed=0)
    opt = case.make_optimizer()
    losses = []
    with gradwatch.watch(case.model, optimizer=opt, auto_fix=True, auto_fix_probe_steps=40,
                         auto_fix_verify_steps=40) as watcher:
        for step in range(160):
            inputs, targets = case.batch(step)
            loss = case.loss_fn(case.model(inputs), targets)
            loss.backward()
            watcher.step(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        events = [(e.action, e.detail) for e in watcher.autofixer.events]
    assert not any(action == "clipping" for action, _ in events), events
    assert events[0][0] == "applied" and "recurrent_init" in events[0][1], events
    assert events[1][0] == "kept", events
    unwatched = models.final_loss(models.train(models.create("recurrent_adam", seed=0), 160))
    assert models.final_loss(losses) < 0.5 * unwatched


# -- the pure rules on synthetic histories --------------------------------------------------------------
def _view(names: list[str], types: list[str], rms: list[float], gains: list[float],
          acts: dict[str, tuple[str, str]] | None = None) -> gradwatch.HistoryView:
    """One sample; weights sized so that ``fan_in * Var(W)`` is ``gains``; ``acts``: {act: (type, feeding)}."""
    import numpy as np

    from gradwatch.activations import LAYER_SIGNAL_METRICS
    from gradwatch.collect import GRAD_METRICS
    from gradwatch.history import ActivationMeta, LayerMeta

    fan, numel = 64, 64 * 64
    meta = [LayerMeta(type_name=t, depth=i, fan_in=fan if "Norm" not in t else None, numel=numel)
            for i, t in enumerate(types)]
    grad = np.full((6, len(names), len(GRAD_METRICS)), np.nan, dtype=np.float32)
    grad[:, :, GRAD_METRICS.index("weight_norm")] = [math.sqrt(g * numel / fan) for g in gains]
    signal = np.full((1, len(names), len(LAYER_SIGNAL_METRICS)), np.nan, dtype=np.float32)
    signal[0, :, 0] = rms
    acts = acts or {}
    return gradwatch.HistoryView(
        layers=names, layer_meta=meta, steps=np.arange(6), grad=grad, total_norm=np.ones(6), loss=np.ones(6),
        activations=list(acts), activation_meta=[ActivationMeta(kind="relu", type_name=t, depth=i, feeding_layer=f)
                                                 for i, (t, f) in enumerate(acts.values())],
        sample_steps=np.array([5]), act=np.zeros((1, len(acts), 3), dtype=np.float32), signal=signal)


def _chain(view: gradwatch.HistoryView) -> causes.Chain:
    return causes.build_chain(view, view.metric("weight_norm")[-1].astype(float))


def test_chains_break_at_normalisation_and_at_non_zero_centred_activations():
    names = ["a", "b", "norm", "c", "d", "e", "f"]
    view = _view(names, ["Linear", "Linear", "LayerNorm", "Linear", "Linear", "Linear", "Linear"], [1.0] * 7, [1.0] * 7,
                 {"s": ("Sigmoid", "d"), "r": ("ReLU", "a")})
    chain = _chain(view)
    assert chain.segments == [[0, 1], [3, 4], [5, 6]]
    assert chain.act_factor[0] == 0.5 and chain.link(0) == pytest.approx(0.5)


def _residual_view(blocks: int, branch_gain: float) -> gradwatch.HistoryView:
    """Blocks ``x + fc2(relu(fc1(x)))``: fc1 at ``branch_gain``, fc2 at 2 (He after a ReLU)."""
    names, types, rms, gains, acts = ["0"], ["Linear"], [1.0], [1.0], {}
    stream = 1.0
    for b in range(1, blocks + 1):
        out1 = branch_gain * stream  # mean squares
        out2 = 2.0 * 0.5 * out1
        names += [f"{b}.fc1", f"{b}.fc2"]
        types += ["Linear", "Linear"]
        rms += [math.sqrt(out1), math.sqrt(out2)]
        gains += [branch_gain, 2.0]
        acts[f"{b}.act"] = ("ReLU", f"{b}.fc1")
        stream += out2
    return _view(names, types, rms, gains, acts)


def test_residual_growth_is_found_where_branches_multiply_the_stream():
    view = _residual_view(16, 2.0)  # the stream's variance triples per block
    growth = causes.residual_growth(view, _chain(view), gradwatch.Thresholds())
    assert growth is not None
    assert growth.branch_last_layers == [f"{b}.fc2" for b in range(1, 16)]  # the last one feeds nothing here
    assert growth.growth_decades > 2.5 and growth.mean_junction_ratio == pytest.approx(1.5, rel=1e-3)


def test_additive_residual_growth_is_healthy():
    view = _residual_view(16, 0.02)  # small branches: the stream's variance adds up, ~sqrt(blocks)
    assert causes.residual_growth(view, _chain(view), gradwatch.Thresholds()) is None


def test_compound_init_needs_the_measured_signal_to_agree():
    names = [f"fc{i}" for i in range(1, 21)] + ["head"]
    acts = {f"act{i}": ("ReLU", f"fc{i}") for i in range(1, 21)}
    decaying = [0.5 ** (i / 2) for i in range(21)]  # variance x1/2 per layer, as the weights predict
    view = _view(names, ["Linear"] * 21, decaying, [1.0] * 21, acts)
    found = causes.compound_init(view, _chain(view), 1.0)
    assert found is not None and found.median_link == pytest.approx(0.5) and len(found.layers) == 20
    flat = _view(names, ["Linear"] * 21, [1.0] * 21, [1.0] * 21, acts)  # something unseen keeps the scale
    assert causes.compound_init(flat, _chain(flat), 1.0) is None


@pytest.mark.slow
def test_compound_over_init_is_named_and_he_init_repairs_it_under_adam():
    data = tasks.teacher_classification(torch.Generator().manual_seed(0))
    model = _mlp(30, 128, nn.ReLU, 1.3 * math.sqrt(2.0), 0)  # 1.3x He per layer: x1.69 variance per layer
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    diag, before = _train(model, opt, data, 120)
    exploding = diag.by_kind("exploding")
    assert exploding and exploding[0].fixes[0] == "he_init", str(diag)
    assert exploding[0].evidence["compound_init"]["median_link_variance_gain"] == pytest.approx(1.69, rel=0.05)
    fixed = _mlp(30, 128, nn.ReLU, 1.3 * math.sqrt(2.0), 0)
    opt = torch.optim.Adam(fixed.parameters(), lr=1e-3)
    report = gradwatch.apply_fixes(fixed, diag, optimizer=opt)
    assert [c.fix for c in report.applied] == ["he_init"]
    _, after = _train(fixed, opt, data, 120, watch=False)
    assert models.final_loss(before) > 0.95 * math.log(4)  # at chance without the fix
    assert models.final_loss(after) < 0.6 * models.final_loss(before)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_over_scaled_recurrence_under_adam_is_found_even_after_it_saturated(seed):
    """On some seeds the chaotic recurrence saturates within a few steps: the window's gradients look calm
    under Adam, but the run-long peak and a loss that has not moved still name the recurrence."""
    case = models.create("recurrent_adam", seed=seed)
    opt = case.make_optimizer()
    with gradwatch.watch(case.model, optimizer=opt) as watcher:
        for step in range(case.default_steps):
            inputs, targets = case.batch(step)
            loss = case.loss_fn(case.model(inputs), targets)
            loss.backward()
            watcher.step(loss)  # the loss tells a stuck run from one that learns
            opt.step()
            opt.zero_grad(set_to_none=True)
        diag = watcher.diagnose()
    exploding = diag.by_kind("exploding")
    assert exploding and exploding[0].fixes[0] == "recurrent_init" and "clip_gradients" not in exploding[0].fixes, str(diag)
