"""Fixes for gradient-flow problems: recommend them as code, or apply them to the live model.

Each fix is a small unit in its own module, registered by name (see :func:`list_fixes`). Its class
is the one place its facts are declared (:class:`~gradwatch.fixes.facts.FixFacts`: ``effect``, the
finding ``kinds`` it treats, ``why`` per kind, ``opt_in``, ``preflight``, ``caps_gradients``); the
diagnosis' reasons, :func:`gradwatch.preflight`'s default set and the auto-fixer read them from there
(:mod:`gradwatch.fixes.registry`). Adding a fix is one module plus its import below.

==================  ==========================================================  ===========
name                what it does                                                effect
==================  ==========================================================  ===========
clip_gradients      global-norm (default 1.0) / AutoClip / AGC clipping as an   training
                    optimizer step pre-hook
he_init             Kaiming (ReLU family) / Xavier (tanh, sigmoid) re-init,     weights
                    biases zeroed, optimizer state reset
insert_batchnorm    BatchNorm1d/2d/3d (or ChannelLastBatchNorm) after           structural
                    Linear/Conv layers
residual            ``x + alpha * block(x)`` around shape-preserving blocks     structural
swap_activation     Sigmoid/Tanh -> ReLU family (LeakyReLU for dead units)      structural
lstm_gru            ``nn.RNN`` -> ``nn.GRU`` / RNN-compatible LSTM, with the    structural
                    state-keeping gate biased to keep
lower_lr            recommend a smaller learning rate                           advice
skip_spikes         opt-in: skip the update of a spike step (optimizer step     training
                    pre-hook; optimizer state untouched)
mixed_precision     recommend bfloat16 or a higher GradScaler scale             advice
rescale_residual    zero (or scale) the last layer of each measured residual    weights
                    branch (SkipInit / Fixup)
recurrent_init      orthogonal ``W_hh`` for ``nn.RNN`` layers whose spectral    weights
                    radius is above 1
==================  ==========================================================  ===========

The entry points: :func:`apply_fixes` (policy and report), :func:`replay` (rebuild a fixed
model's structure on a fresh instance so its checkpoint loads strictly), :func:`snapshot`
(roll a model and its optimizer back bit for bit).

Contract with the diagnosis (which fills ``Finding``):
    * ``vanishing``: ``layers`` = parameter layers whose gradients vanish, early first;
      ``evidence["activations"]`` = hidden saturating activation modules implicated (never the
      output activation); fixes ranked, e.g. ``("swap_activation", "he_init", "insert_batchnorm",
      "residual")`` behind sigmoid/tanh, ``("lstm_gru",)`` for ``nn.RNN``,
      ``("he_init", "insert_batchnorm", "residual")`` for init/depth causes.
    * ``exploding``: ``layers`` = affected parameter layers; evidence may hold
      ``"total_norm_percentiles": {"p10", "p50", "p90"}``, ``"total_norm_history"`` (list) and
      ``"optimizer_scale_invariant"`` (Adam-like); fixes e.g. ``("he_init", "insert_batchnorm",
      "lower_lr")`` for over-scaled weights, ``("clip_gradients", "lower_lr")`` otherwise.
    * ``nonfinite``: fixes ``("clip_gradients", "lower_lr")``.
    * causes that compound (:mod:`gradwatch.causes`): a vanishing finding with
      ``evidence["compound_init"]`` ranks ``he_init`` first on ``evidence["fix_layers"]``; an exploding
      (and the non-finite) finding with ``evidence["residual_growth"]["branch_last_layers"]`` ranks
      ``rescale_residual`` first, which acts on those measured layers only; a recurrent explosion
      under Adam-like optimizers ranks ``("recurrent_init", "lstm_gru", "lower_lr")``.
    * ``dead_units`` / ``saturation``: ``layers`` = activation module names;
      ``evidence["feeding_layers"]`` = the parameter layers feeding them; fixes e.g.
      ``("he_init", "swap_activation")`` / ``("swap_activation", "insert_batchnorm", "he_init")``.
    * ``Diagnosis.structure`` (from :func:`gradwatch.layers.observe_structure`) gives the forward
      order and shapes; fixes that need shapes refuse without it (or ``example_input=``).
"""

from gradwatch.fixes import (  # noqa: F401  (importing a fix module registers it)
    clip_gradients,
    he_init,
    insert_batchnorm,
    lower_lr,
    lstm_gru,
    mixed_precision,
    recurrent_init,
    rescale_residual,
    residual,
    skip_spikes,
    swap_activation,
)
from gradwatch.fixes.apply import apply_fixes
from gradwatch.fixes.base import Applicability, Fix, FixContext, Plan
from gradwatch.fixes.clipping import GradientClipper, attached_clippers
from gradwatch.fixes.facts import Effect
from gradwatch.fixes.modules import ChannelLastBatchNorm, LSTMAsRNN, Residual, keep_gate_bias_
from gradwatch.fixes.ops import FixReportError, RecordError
from gradwatch.fixes.record import Change, FixReport
from gradwatch.fixes.registry import get_fix, list_fixes, register_fix, unregister_fix
from gradwatch.fixes.replay import replay
from gradwatch.fixes.snapshot import Snapshot, snapshot

__all__ = [
    "Applicability",
    "Change",
    "Effect",
    "ChannelLastBatchNorm",
    "Fix",
    "FixContext",
    "FixReport",
    "FixReportError",
    "GradientClipper",
    "LSTMAsRNN",
    "Plan",
    "RecordError",
    "Residual",
    "Snapshot",
    "apply_fixes",
    "attached_clippers",
    "get_fix",
    "keep_gate_bias_",
    "list_fixes",
    "register_fix",
    "replay",
    "snapshot",
    "unregister_fix",
]
