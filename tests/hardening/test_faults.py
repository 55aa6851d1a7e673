"""Faults during training: gradwatch keeps working or detaches with one clear message, the event files
written so far stay readable, and the user's model and optimizer end up exactly as without gradwatch.

Every test runs the same faulty training twice from the same seed, once watched (``log_dir`` and
activation sampling on every step, so every hook is exercised) and once not, and compares parameters,
gradients, buffers, modes, hooks and optimizer state bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gw_testing import vector_task
from hw_helpers import accumulate, assert_identical, errors, gradwatch_records, scalar_steps, state_bits
from torch import nn

import gradwatch
from gradwatch.logs import read_run

STEPS = 12
WATCH = {"activation_every_n_steps": 1, "histogram_every_n_steps": 2, "slow_stats_every_n": 2,
         "figure_every_n_steps": 0, "diagnose_every_n_steps": 4}


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


Fault = Callable[[int, nn.Module, torch.optim.Optimizer, torch.Tensor], torch.Tensor | None]


def run(model: nn.Module, opt: torch.optim.Optimizer, watcher: gradwatch.GradWatcher | None,
        fault: Fault | None = None, skip_errors: bool = False, steps: int = STEPS) -> list[int]:
    """The user's loop: forward, loss, fault(step) (may raise or return a new loss), backward,
    watcher.step, optimizer step. With ``skip_errors`` a RuntimeError skips the batch (as some loops do)."""
    batch = vector_task()
    skipped = []
    for step in range(steps):
        try:
            x, y = batch(step)
            loss = F.cross_entropy(model(x), y)
            if fault is not None:
                loss = fault(step, model, opt, loss) or loss
            loss.backward()
            if watcher is not None:
                watcher.step(loss)
            opt.step()
        except RuntimeError:
            if not skip_errors:
                raise
            skipped.append(step)
        finally:
            opt.zero_grad()
    return skipped


def twin(fault: Fault | None, tmp_path: Path, *, skip_errors: bool = False, expect: type[BaseException] | None = None,
         opt_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None, **watch: object):
    """Run the faulty loop unwatched and watched; returns (watcher, unwatched state, watched state, log records)."""
    make_opt = opt_factory or (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
    states = []
    for watched in (False, True):
        model = net()
        opt = make_opt(model)
        watcher = gradwatch.watch(model, log_dir=tmp_path, **{**WATCH, **watch}) if watched else None
        with gradwatch_records() as records:
            try:
                if expect is not None:
                    with pytest.raises(expect):
                        run(model, opt, watcher, fault, skip_errors)
                else:
                    run(model, opt, watcher, fault, skip_errors)
            finally:
                if watcher is not None:
                    watcher.close()
        states.append(state_bits(model, opt))
    return watcher, states[0], states[1], records


def readable(tmp_path: Path, steps: list[int]) -> None:
    """The run's events read back with TensorBoard's reader and with gradwatch's, no problem reported."""
    assert scalar_steps(tmp_path) == steps
    run_log = read_run(tmp_path)
    assert run_log.problems == []
    assert sorted(run_log.frame.loc[run_log.frame.metric == "grad_norm", "step"].unique().tolist()) == steps
    assert isinstance(str(run_log.diagnose()), str)


def test_exception_inside_the_training_step_propagates_and_loses_nothing(tmp_path: Path) -> None:
    def boom(step: int, *_: object) -> None:
        if step == 7:
            raise ValueError("bad batch")

    w, plain, watched, records = twin(boom, tmp_path, expect=ValueError)
    assert_identical(plain, watched)
    assert w.closed and w.error is None and not errors(records)
    readable(tmp_path, list(range(7)))


def test_exception_skipped_by_the_loop_keeps_the_watcher_working(tmp_path: Path) -> None:
    """A loop that skips failing batches: forwards that die half-way (hooks armed, graph cut) must not
    stop or confuse the watcher on the following steps."""
    def flaky(step: int, model: nn.Module, opt: object, loss: torch.Tensor) -> None:
        if step in (3, 4, 9):
            raise RuntimeError("CUDA-like transient error")

    w, plain, watched, records = twin(flaky, tmp_path, skip_errors=True)
    assert_identical(plain, watched)
    assert w.error is None and not errors(records)
    kept = [s for s in range(STEPS) if s not in (3, 4, 9)]
    assert w.collected == len(kept)
    df = w.to_dataframe()
    samples = df[df.metric == "dead_frac"].step.unique().tolist()
    assert len(samples) == len(kept)  # sampled on every collected step
    readable(tmp_path, list(range(len(kept))))


def test_a_failed_batch_never_leaves_its_activation_sample_to_the_next_step() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: only the inputs change act_rms

    def scaled_and_failing(step: int, model: nn.Module, opt: object, loss: torch.Tensor) -> None:
        if step == 3:
            raise RuntimeError("bad batch")

    batch = vector_task()

    def loud_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch(step)
        return (x * 1000.0 if step == 3 else x), y  # the failing batch is 1000x louder

    with gradwatch.watch(model, activation_every_n_steps=1) as w:
        for step in range(6):
            try:
                x, y = loud_batch(step)
                loss = F.cross_entropy(model(x), y)
                scaled_and_failing(step, model, opt, loss)
                loss.backward()
                w.step(loss, global_step=step)
            except RuntimeError:
                pass
            opt.zero_grad()
    df = w.to_dataframe()
    rms = df[(df.metric == "act_rms") & (df.layer == "0")].set_index("step")["value"]
    assert 3 not in rms.index
    assert rms.loc[4] == pytest.approx(rms.loc[2], rel=0.5)  # the quiet batch 4, not the loud failed batch 3


def test_keyboard_interrupt_in_the_loop_closes_cleanly(tmp_path: Path) -> None:
    def ctrl_c(step: int, *_: object) -> None:
        if step == 5:
            raise KeyboardInterrupt

    w, plain, watched, records = twin(ctrl_c, tmp_path, expect=KeyboardInterrupt)
    assert_identical(plain, watched)
    assert w.closed and not errors(records)
    readable(tmp_path, list(range(5)))


def test_keyboard_interrupt_inside_the_watcher_then_training_resumes(tmp_path: Path) -> None:
    """Ctrl-C that lands inside ``watcher.step()`` (here: while a sink writes): the interrupt is the
    user's and propagates; a notebook user who resumes the loop gets a watcher that still works."""
    class InterruptOnce:
        fired = False

        def write_step(self, record: object) -> None:
            if not self.fired and getattr(record, "step", None) == 4:
                self.fired = True
                raise KeyboardInterrupt

        def write_histograms(self, step: int, layers: object) -> None: ...
        def write_diagnosis(self, step: int, diagnosis: object) -> None: ...
        def flush(self) -> None: ...
        def close(self) -> None: ...

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, log_dir=tmp_path, sinks=[InterruptOnce()], **WATCH)
    with gradwatch_records() as records:
        with pytest.raises(KeyboardInterrupt):
            run(model, opt, watcher)
        opt.zero_grad()
        run(model, opt, watcher)  # resumed
        watcher.close()
    assert watcher.error is None and not errors(records)
    v = watcher.history.view()
    assert v.total_steps == 5 + STEPS  # every step that reached the history, the interrupted one included
    assert (v.steps[1:] > v.steps[:-1]).all()  # step numbers stay unique and increasing
    assert scalar_steps(tmp_path)[-1] == int(v.steps[-1])


def test_keyboard_interrupt_inside_the_watcher_keeps_the_counters_consistent(tmp_path: Path) -> None:
    class InterruptAtStep2:
        def write_step(self, record: object) -> None:
            if getattr(record, "step", None) == 2:
                raise KeyboardInterrupt

        def write_histograms(self, step: int, layers: object) -> None: ...
        def write_diagnosis(self, step: int, diagnosis: object) -> None: ...
        def flush(self) -> None: ...
        def close(self) -> None: ...

    model = net()
    with gradwatch.watch(model, sinks=[InterruptAtStep2()], **WATCH) as watcher:
        with pytest.raises(KeyboardInterrupt):
            run(model, torch.optim.SGD(model.parameters(), lr=0.05), watcher, steps=4)
    assert watcher.collected == watcher.history.total_steps


def test_nan_loss_is_counted_reported_and_changes_nothing(tmp_path: Path) -> None:
    def nan_loss(step: int, model: nn.Module, opt: object, loss: torch.Tensor) -> torch.Tensor | None:
        return loss * math.nan if step == 6 else None

    w, plain, watched, records = twin(nan_loss, tmp_path)
    assert_identical(plain, watched)
    assert w.error is None and not errors(records)
    v = w.history.view()
    assert v.first_nonfinite is not None and v.first_nonfinite[0] == 6
    d = w.diagnose()
    assert "nonfinite" in d.kinds()
    readable(tmp_path, list(range(STEPS)))
    acc = accumulate(tmp_path)
    assert any(e.value > 0 for e in acc.Scalars("nonfinite/00.0"))
    for tag in acc.Tags()["histograms"]:  # NaN never reaches a histogram's numbers
        for e in acc.Histograms(tag):
            h = e.histogram_value
            assert all(math.isfinite(x) for x in (h.min, h.max, h.sum, h.sum_squares)), (tag, e.step)


@pytest.mark.parametrize("hooked", [False, True], ids=["manual-step", "optimizer-hook"])
def test_optimizer_step_skipped_by_the_amp_grad_scaler(tmp_path: Path, hooked: bool) -> None:
    """``torch.amp.GradScaler('cpu')`` skips ``optimizer.step()`` when the unscaled gradients hold an inf."""
    results = []
    for watched in (False, True):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        watcher = None
        if watched:
            watcher = gradwatch.watch(model, log_dir=tmp_path, optimizer=opt if hooked else None, **WATCH)
        batch = vector_task()
        scales = []
        with gradwatch_records() as records:
            for step in range(STEPS):
                x, y = batch(step)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
                if step in (2, 3, 8):
                    model[2].weight.grad[0, 0] = math.inf  # overflow: this step must be skipped
                scaler.unscale_(opt)
                if watcher is not None:
                    watcher.step(loss)
                scaler.step(opt)
                scaler.update()
                scales.append(scaler.get_scale())
                opt.zero_grad()
            if watcher is not None:
                watcher.close()
        results.append((state_bits(model, opt), scales))
        if watched:
            assert watcher.error is None and not errors(records)
            # a skipped optimizer step never runs the step pre-hook: collected only on real steps
            assert watcher.collected == (STEPS - 3 if hooked else STEPS)
            v = watcher.history.view()
            assert v.nonfinite_steps == (0 if hooked else 3)
    assert_identical(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]  # the scaler saw the same infs
    readable(tmp_path, list(range(STEPS - 3 if hooked else STEPS)))


#: float32 -> float64 -> bfloat16 -> (an accelerator and back, where there is one) -> .to("cpu") -> float32
CONVERSIONS = (None, torch.float64, torch.bfloat16, *(("cuda", "cpu") if torch.cuda.is_available() else ()), "cpu",
               torch.float32)


@pytest.mark.parametrize("overwrite", [False, True], ids=["in-place", "new-parameters"])
def test_model_converted_between_dtypes_and_moved_mid_run(tmp_path: Path, overwrite: bool) -> None:
    """The model converted and moved while watched (``CONVERSIONS``): statistics stay right."""
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    try:
        model = net()
        opt_holder: list[torch.optim.Optimizer] = []
        watcher = gradwatch.watch(model, log_dir=tmp_path, **{**WATCH, "slow_stats_every_n": 1})
        batch = vector_task()
        seen = []
        with gradwatch_records() as records:
            for phase, convert in enumerate(CONVERSIONS):
                if convert is not None:
                    model.to(convert)
                dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
                opt_holder[:] = [torch.optim.SGD(model.parameters(), lr=0.05)]  # new parameters: a new optimizer
                for step in range(3):
                    x, y = batch(step)
                    loss = F.cross_entropy(model(x.to(device, dtype)), y.to(device))
                    loss.backward()
                    watcher.step(loss)
                    ref = float(torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in model[0].parameters()])))
                    got = watcher.history.view(last=1).metric("grad_norm")[0, 0]
                    seen.append((phase, str(dtype), got, ref))
                    opt_holder[0].step()
                    opt_holder[0].zero_grad()
            watcher.close()
        assert watcher.error is None and not errors(records)
        assert watcher.collected == 3 * len(CONVERSIONS)
        for phase, dtype, got, ref in seen:
            assert got == pytest.approx(ref, rel=1e-4), (phase, dtype)
        readable(tmp_path, list(range(3 * len(CONVERSIONS))))
        assert watcher.history.layers == ["0", "2", "4"]  # the same layers, not duplicated by the conversions
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)


def test_layer_added_and_removed_mid_run(tmp_path: Path) -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, log_dir=tmp_path, **WATCH)
    batch = vector_task()
    with gradwatch_records() as records:
        def train(steps: int) -> None:
            for step in range(steps):
                x, y = batch(step)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                watcher.step(loss)
                opt.step()
                opt.zero_grad()

        train(4)
        extra = nn.Linear(32, 32)
        model.insert(4, extra)  # a new layer before the head
        opt.add_param_group({"params": list(extra.parameters())})
        train(4)
        del model[2]  # a layer removed (its Tanh stays: 32 -> 32 still)
        train(4)
        watcher.close()
    assert watcher.error is None and not errors(records)
    assert watcher.collected == 12
    df = watcher.to_dataframe()
    norms = df[(df.metric == "grad_norm") & (df.layer != "(total)")]
    # the new layer is recorded from the first slow step after it appeared; the removed one until it left
    assert set(norms.layer) >= {"0", "2", "4", "5"}
    last = norms[norms.step == norms.step.max()]
    assert set(last.layer) == {layer.name for layer in watcher.layers}
    d = watcher.diagnose()
    assert [r.name for r in d.layers] == [layer.name for layer in watcher.layers]
    readable(tmp_path, list(range(12)))


def test_internal_failure_detaches_with_one_message_and_training_goes_on(tmp_path: Path) -> None:
    """An error inside gradwatch (a sink that breaks) is logged once, every hook is removed, and the
    run finishes exactly as without gradwatch; what was written before stays readable."""
    class Breaks:
        def write_step(self, record: object) -> None:
            if getattr(record, "step", 0) >= 5:
                raise RuntimeError("sink bug")

        def write_histograms(self, step: int, layers: object) -> None: ...
        def write_diagnosis(self, step: int, diagnosis: object) -> None: ...
        def flush(self) -> None: ...
        def close(self) -> None: ...

    w, plain, watched, records = twin(None, tmp_path, sinks=[Breaks()])
    assert_identical(plain, watched)  # hooks included: nothing of gradwatch is left on the model
    msgs = errors(records)
    assert len(msgs) == 1 and "sink bug" in msgs[0] and "detached" in msgs[0], msgs
    assert w.error is not None and w.collected == 5
    readable(tmp_path, list(range(5)))  # the TensorBoard sink comes after the user's: step 5 never reached it
