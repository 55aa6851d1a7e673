"""The one place where the diagnosis' thresholds live, each with the principle behind it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    """Diagnosis thresholds. Override any of them: ``Thresholds(vanishing_decades=2.5)``.

    Depth comparisons use ratios (decades of log10), never absolute gradient sizes, so multiplying
    the loss by any constant changes no finding except the absolute grad-to-weight rule, whose unit
    is "one plain-SGD step of size lr=1 moves the layer by its own size".

    Attributes:
        window: how many of the most recent collected steps a diagnosis looks at.
        min_steps: below this many collected steps no trend-based finding is made (a note says so).
        persistence: fraction of the window's steps in which a condition must hold to count as
            sustained (a transient spike is not a finding).
        min_depth_layers: depth-decay rules need at least this many comparable layers.
        vanishing_decades: early layers' gradient (relative to their weights, or the backward
            signal) this many orders of magnitude below the late layers' is vanishing.
        vanishing_critical_decades: ... and this many is critical.
        min_rank_correlation: the decay must be a trend across depth (Spearman correlation between
            depth and log-gradient at least this), not one odd layer.
        exploding_grad_to_weight: a layer whose gradient norm exceeds its weight norm by this factor
            (sustained) is exploding: one SGD step with lr=0.1 would move it by its own size.
        exploding_critical_grad_to_weight: ... and by this factor it is critical.
        exploding_update_ratio: one optimizer step that moved a layer by this many times its own
            norm (measured update-to-weight ratio; or the gradient ratio times an SGD learning rate)
            is an explosion, even once, even long ago.
        small_weight_factor: layers whose weight RMS is below this fraction of the 1/sqrt(fan_in)
            init scale are skipped by the grad-to-weight explosion rule (a near-zero-initialised
            layer has a large ratio by construction, not an explosion).
        exploding_depth_decades: early layers' relative gradients this many decades *above* the late
            layers' (growth towards the input) is exploding.
        exploding_growth_decades: the total gradient norm growing this many decades within the window
            is exploding.
        forward_growth_decades: layer outputs growing this many decades from the first to the last
            layer is an exploding forward signal.
        over_scaled_init: weights whose RMS is this many times the He scale sqrt(2/fan_in) are
            over-scaled (the forward variance grows 4x per ReLU layer at 2x): the cause to fix is
            the initialisation, not the gradients.
        under_scaled_init: weights below this fraction of the Xavier/He scale are under-scaled.
        dead_frac: fraction of a ReLU-family layer's units inactive on every sample (the smallest
            such fraction over the recent samples: a dead unit stays dead, an unlucky one does not): warning.
        dead_critical_frac: ... critical.
        dead_min_samples: a unit must have been seen on at least this many values (batch x
            positions) for "never active" to mean dead rather than unlucky (0.5 ** 16 ~ 1.5e-5).
        saturated_frac: fraction of a sigmoid/tanh layer's outputs in the flat region: warning.
        saturated_critical_frac: ... critical.
        learning_loss_drop: a recurrent layer's gradient decaying through time is only a finding
            while the loss (when ``watcher.step(loss)`` provides it) has fallen less than this
            fraction from the run's start: a model that learns its task is not blocked by forgetting
            what the task does not need.
        spike_z: a layer's log gradient norm this many robust deviations (1.4826 x MAD over its
            trailing ``spike_baseline`` steps) above its trailing median is a spike candidate ...
        spike_ratio: ... and it must also be this many times that median (both: see ``gradwatch.spikes``).
        spike_total_ratio: ... and the step's total norm this many times its own trailing median.
        spike_baseline: trailing steps forming each step's baseline.
        spike_min_baseline: steps with fewer finite baseline values are not judged: the run's start, where
            norms still trend as learning begins, is judged only once a full baseline window exists.
        spike_lookback: steps before the diagnosis window in which spikes are also counted (first spike,
            recurrence); a finding still needs a spike inside the window.
        underflow_zero_rise: fp16 underflow: a layer's exactly-zero gradient fraction risen by at least this
            much (absolute) over the run's lowest ...
        underflow_max_scale: ... while the GradScaler's loss scale is at most this.
        amp_tolerated_nonfinite: unused since 0.1.0 (kept so old configurations load): with fp16
            loss scaling, non-finite gradients are a finding only while they occur in at least half
            of the latest four collected steps (calibration overflows are skipped steps).
    """

    window: int = 50
    min_steps: int = 5
    persistence: float = 0.6
    min_depth_layers: int = 3
    vanishing_decades: float = 3.0
    vanishing_critical_decades: float = 5.0
    min_rank_correlation: float = 0.5
    exploding_grad_to_weight: float = 10.0
    exploding_critical_grad_to_weight: float = 1000.0
    exploding_update_ratio: float = 1.0
    small_weight_factor: float = 0.1
    exploding_depth_decades: float = 3.0
    exploding_growth_decades: float = 2.0
    forward_growth_decades: float = 3.0
    over_scaled_init: float = 2.0
    under_scaled_init: float = 0.3
    dead_frac: float = 0.5
    dead_critical_frac: float = 0.9
    dead_min_samples: int = 16
    saturated_frac: float = 0.5
    saturated_critical_frac: float = 0.9
    amp_tolerated_nonfinite: float = 0.05
    learning_loss_drop: float = 0.25
    spike_z: float = 6.0
    spike_ratio: float = 10.0
    spike_total_ratio: float = 2.0
    spike_baseline: int = 50
    spike_min_baseline: int = 50
    spike_lookback: int = 200
    underflow_zero_rise: float = 0.2
    underflow_max_scale: float = 128.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value != value or value < 0:
                raise ValueError(f"Thresholds.{f.name} must be a non-negative number, got {value!r}")
        for name in ("persistence", "dead_frac", "dead_critical_frac", "saturated_frac", "saturated_critical_frac",
                     "amp_tolerated_nonfinite", "min_rank_correlation", "learning_loss_drop"):
            if getattr(self, name) > 1:
                raise ValueError(f"Thresholds.{name} is a fraction in [0, 1], got {getattr(self, name)!r}")
        if self.window < 1 or self.min_steps < 1:
            raise ValueError("Thresholds.window and Thresholds.min_steps must be >= 1")

    def updated(self, **changes: Any) -> Thresholds:
        """A copy with some thresholds changed; unknown names raise ``TypeError`` naming them."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown threshold(s) {unknown}; known: {sorted(known)}")
        return replace(self, **changes)
