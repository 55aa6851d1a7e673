"""GradWatchCallback fixes inside real ``lightning.Trainer`` runs: auto-fix mid-run, clipping, preflight, resume.

Single process on CPU; the two-process DDP runs are in ``test_lightning_autofix_distributed.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import GradClipAlgorithmType
from lit_fix_models import LitFixMLP, LitNoLoader, loader
from lit_models import TRAINER_DEFAULTS, dataset
from torch import nn

import gradwatch
from gradwatch.integrations import lightning_checkpoint
from gradwatch.integrations.lightning import GradWatchCallback, replay_checkpoint
from gradwatch.integrations.lightning_autofix import TrainerClipping

STEPS_PER_EPOCH = 8  # 64 samples, batch 8


def _trainer(tmp_path: Path, *callbacks: Callback, **kwargs: Any) -> L.Trainer:
    options = {**TRAINER_DEFAULTS, "default_root_dir": str(tmp_path), "logger": False, "enable_checkpointing": False,
               "max_epochs": 1, "callbacks": list(callbacks)}
    options.update(kwargs)
    return L.Trainer(**options)


def _sigmoid_mlp(**kwargs: Any) -> LitFixMLP:
    torch.manual_seed(0)
    return LitFixMLP(act=nn.Sigmoid, depth=8, **kwargs)


def _batchnorm_callback(**kwargs: Any) -> GradWatchCallback:
    return GradWatchCallback(auto_fix=("insert_batchnorm",), auto_fix_probe_steps=5, verbose=False, **kwargs)


class _Probe(Callback):
    """Records, after each optimizer step, what the optimizer holds for one old parameter (``net.2``'s weight)."""

    def __init__(self) -> None:
        self.buffers: dict[int, int] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        weight = next(p for n, p in pl_module.named_parameters() if n in ("net.2.weight", "net.2.0.weight"))
        self.buffers[trainer.global_step - 1] = id(trainer.optimizers[0].state[weight]["momentum_buffer"])


# -- arguments ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"preflight": ("batchnorm",)}, ValueError, r"preflight has unknown value\(s\) \['batchnorm'\]; allowed: .*'insert_batchnorm'"),
        ({"fix_options": {"swap": {}}}, ValueError, r"fix_options has unknown value\(s\) \['swap'\]"),
        ({"fix_options": {"residual": 0.5}}, TypeError, "fix_options must be a dict of per-fix option dicts"),
        ({"loss_fn": "cross_entropy"}, TypeError, "loss_fn must be callable"),
        ({"preflight_steps": 0}, ValueError, "preflight_steps must be an integer >= 1"),
        ({"auto_fix_probe_steps": 0}, ValueError, "auto_fix_probe_steps must be an integer >= 1"),
    ],
)
def test_fix_arguments_are_validated(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        GradWatchCallback(**kwargs)


# -- auto-fix mid-run: structural -------------------------------------------------------------------------
def test_structural_auto_fix_mid_run_reaches_the_optimizer_and_the_scheduler(tmp_path: Path) -> None:
    model = _sigmoid_mlp(scheduler="lambda", momentum=0.9)
    callback, probe = _batchnorm_callback(auto_fix_verify_steps=100), _Probe()
    trainer = _trainer(tmp_path, callback, probe)
    trainer.fit(model)  # LambdaLR zips base_lrs with the param groups strictly: a group it lacks raises

    [event] = callback.auto_fix_events
    assert (event.step, event.action) == (4, "applied")  # the 5th collected step ends the probe window
    inserted = [m for m in model.net if isinstance(m, nn.Sequential)]
    assert len(inserted) == 7 and all(isinstance(m[1], nn.BatchNorm1d) for m in inserted)
    optimizer = trainer.optimizers[0]
    assert [len(g["params"]) for g in optimizer.param_groups] == [16, 14]  # old params; the BatchNorms' own group
    new = optimizer.param_groups[1]["params"]
    assert {id(p) for p in new} == {id(p) for m in inserted for p in m[1].parameters()}
    assert all("momentum_buffer" in optimizer.state[p] for p in new)  # stepped 3 times (steps 5, 6, 7)
    assert all(not torch.equal(m[1].bias, torch.zeros(16)) for m in inserted)
    # the other parameters kept their state: the same momentum buffer before and after the fix
    assert probe.buffers[3] == probe.buffers[4] == probe.buffers[7]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert len(scheduler.base_lrs) == len(scheduler.lr_lambdas) == len(scheduler.get_last_lr()) == 2
    expected = 0.1 * 0.95**STEPS_PER_EPOCH
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected, expected])  # both scheduled
    assert [r["source"] for r in callback.fix_records] == ["auto_fix"]
    assert callback.watcher is not None and "net.0.0" in {layer.name for layer in callback.watcher.layers}


def test_rolled_back_fix_leaves_optimizer_scheduler_and_records_as_before(tmp_path: Path) -> None:
    # The loss is 10x larger once a BatchNorm exists: verification must undo the fix.
    model = _sigmoid_mlp(scheduler="step", worse_with_batchnorm=True)
    callback = _batchnorm_callback(auto_fix_verify_steps=2)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = _trainer(tmp_path, callback, ckpt, enable_checkpointing=True)
    trainer.fit(model)
    assert [(e.step, e.action) for e in callback.auto_fix_events] == [(4, "applied"), (6, "rolled_back")]
    assert "loss got worse" in callback.auto_fix_events[1].detail
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    optimizer = trainer.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert len(optimizer.param_groups) == 1 and len(scheduler.base_lrs) == len(scheduler.get_last_lr()) == 1
    # StepLR multiplies the group's current lr: had the rollback put back the lr of step 4, it would stay stale
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**STEPS_PER_EPOCH)
    assert callback.fix_records == []
    # nothing to replay: a fresh model loads the checkpoint
    resumed = _batchnorm_callback()
    _trainer(tmp_path, resumed, max_epochs=2).fit(_sigmoid_mlp(scheduler="step"), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.replayed == [] and [e.action for e in resumed.auto_fix_events] == ["applied", "rolled_back"]


# -- persistence and resume ------------------------------------------------------------------------------
def test_fixed_run_resumes_from_its_checkpoint_with_the_record_replayed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _batchnorm_callback(auto_fix_verify_steps=2)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trained = _sigmoid_mlp(scheduler="lambda", momentum=0.9)
    _trainer(tmp_path, first, ckpt, enable_checkpointing=True).fit(trained)
    assert [(e.step, e.action) for e in first.auto_fix_events] == [(4, "applied"), (6, "kept")]
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=True)  # plain data only: loads with weights_only=True
    state = saved["callbacks"][first.state_key]
    [record] = state["fix_records"]
    assert record["source"] == "auto_fix" and record["step"] == 4
    assert gradwatch.fixes.FixReport.from_dict(record["report"]).applied[0].fix == "insert_batchnorm"
    assert state["autofix"]["state"] == "done" and len(state["optimizer_layout"]) == 2
    assert len(saved["optimizer_states"][0]["param_groups"]) == 2

    replays: list[int] = []
    original = lightning_checkpoint.replay
    monkeypatch.setattr(lightning_checkpoint, "replay", lambda m, r: replays.append(1) or original(m, r))
    resumed = _batchnorm_callback(auto_fix_verify_steps=2)
    fresh = _sigmoid_mlp(scheduler="lambda", momentum=0.9)
    trainer = _trainer(tmp_path, resumed, max_epochs=2)
    trainer.fit(fresh, ckpt_path=str(path))  # strict load: only possible after the replay

    assert len(replays) == 1 and len(resumed.replayed) == 7
    assert [op["op"] for op in resumed.replayed] == ["wrap_norm"] * 7
    assert resumed.fix_records == first.fix_records
    # history and the auto-fixer continue: no second decision, the earlier events kept
    assert [(e.step, e.action) for e in resumed.auto_fix_events] == [(4, "applied"), (6, "kept")]
    assert sorted(resumed.to_dataframe().step.unique()) == list(range(2 * STEPS_PER_EPOCH))
    # the optimizer was rebuilt with the saved groups, so its state (momentum) loaded; the schedule continues
    optimizer = trainer.optimizers[0]
    assert [len(g["params"]) for g in optimizer.param_groups] == [16, 14]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 2 * STEPS_PER_EPOCH and len(scheduler.lr_lambdas) == 2
    expected = 0.1 * 0.95 ** (2 * STEPS_PER_EPOCH)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected, expected])

    # the same instance again (e.g. trainer.validate with the checkpoint): nothing replayed twice
    val = resumed_val = GradWatchCallback(verbose=False)
    _trainer(tmp_path, val).validate(fresh, dataloaders=loader(), ckpt_path=str(path))
    assert resumed_val.replayed == [] and len(replays) == 1
    # ... and a fresh instance in validate: replayed there too
    other = _sigmoid_mlp()
    _trainer(tmp_path, GradWatchCallback(verbose=False)).validate(other, dataloaders=loader(), ckpt_path=str(path))
    assert isinstance(other.net[0], nn.Sequential)


def test_inference_from_a_fixed_checkpoint_with_replay(tmp_path: Path) -> None:
    callback = _batchnorm_callback(auto_fix_verify_steps=2)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trained = _sigmoid_mlp()
    _trainer(tmp_path, callback, ckpt, enable_checkpointing=True).fit(trained)
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    x = dataset(16).tensors[0]
    trained.eval()

    fresh = _sigmoid_mlp()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(checkpoint["state_dict"])
    ops = replay_checkpoint(fresh, path)
    assert len(ops) == 7
    fresh.load_state_dict(checkpoint["state_dict"])  # strict
    torch.testing.assert_close(fresh.eval()(x), trained(x), rtol=0, atol=0)

    by_hand = _sigmoid_mlp()  # the record is plain data: gradwatch.fixes.replay takes its report
    for record in checkpoint["callbacks"][callback.state_key]["fix_records"]:
        gradwatch.replay(by_hand, record["report"])
    by_hand.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(by_hand.eval()(x), trained(x), rtol=0, atol=0)


def test_resume_during_verification_keeps_the_fix_unverified(tmp_path: Path) -> None:
    first = _batchnorm_callback(auto_fix_verify_steps=100)  # still verifying when the epoch's checkpoint is saved
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _trainer(tmp_path, first, ckpt, enable_checkpointing=True).fit(_sigmoid_mlp())
    assert first.watcher is not None and first.watcher.autofixer.state == "verifying"
    resumed = _batchnorm_callback(auto_fix_verify_steps=100)
    _trainer(tmp_path, resumed, max_epochs=2).fit(_sigmoid_mlp(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [(e.step, e.action) for e in resumed.auto_fix_events] == [(4, "applied"), (8, "kept")]
    assert "not saved in checkpoints" in resumed.auto_fix_events[1].detail
    assert resumed.watcher is not None and resumed.watcher.autofixer.state == "done" and len(resumed.replayed) == 7


# -- clipping ------------------------------------------------------------------------------------------------
def _exploding_mlp() -> LitFixMLP:
    torch.manual_seed(0)
    return LitFixMLP(act=nn.ReLU, depth=3, loss_scale=1e4, lr=1e-6)


def test_clipping_auto_fix_drives_the_trainers_clipping_and_survives_resume(tmp_path: Path) -> None:
    model = _exploding_mlp()
    callback = GradWatchCallback(auto_fix=("clip_gradients",), auto_fix_probe_steps=5, diagnose_every_n_steps=5,
                                 verbose=False)
    logger = CSVLogger(str(tmp_path), name="csv")
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = _trainer(tmp_path, callback, ckpt, logger=logger, log_every_n_steps=1, enable_checkpointing=True)
    trainer.fit(model)

    assert [(e.step, e.action) for e in callback.auto_fix_events] == [(4, "nothing"), (4, "clipping")]
    event = callback.auto_fix_events[1]  # ("nothing": no structural or re-init fix was allowed)
    assert "gradient_clip_val=1.0" in event.detail
    assert trainer.gradient_clip_val == 1.0 and trainer.gradient_clip_algorithm == GradClipAlgorithmType.NORM
    # gradwatch records the gradients before Lightning clips them; the optimizer stepped clipped ones
    total = callback.to_dataframe().query("layer == '(total)' and metric == 'grad_norm'").set_index("step")["value"]
    assert (total > 100).all()
    # (stepped_norms: read at the next step's zero_grad, so the last step has none)
    assert all(model.stepped_norms[s] > 100 for s in range(4))
    assert all(model.stepped_norms[s] == pytest.approx(1.0, rel=1e-4) for s in range(4, STEPS_PER_EPOCH - 1))
    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    threshold = metrics.dropna(subset=["clip_threshold"]).set_index("step")["clip_threshold"]
    assert sorted(threshold.index.astype(int)) == list(range(5, STEPS_PER_EPOCH)) and (threshold == 1.0).all()
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][callback.state_key]
    assert state["clipping"]["gradient_clip_val"] == 1.0 and state["clipping"]["step"] == 4

    resumed_model = _exploding_mlp()
    resumed = GradWatchCallback(auto_fix=("clip_gradients",), auto_fix_probe_steps=5, diagnose_every_n_steps=5,
                                verbose=False)
    resumed_trainer = _trainer(tmp_path, resumed, max_epochs=2)
    assert resumed_trainer.gradient_clip_val is None
    resumed_trainer.fit(resumed_model, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed_trainer.gradient_clip_val == 1.0
    assert [e.action for e in resumed.auto_fix_events] == ["nothing", "clipping"]  # restored, not decided again
    assert all(resumed_model.stepped_norms[s] == pytest.approx(1.0, rel=1e-4) for s in range(8, 15))

    # a Trainer that clips by itself keeps its own value
    own = _trainer(tmp_path, GradWatchCallback(verbose=False), max_epochs=3, gradient_clip_val=5.0)
    own.fit(_exploding_mlp(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert own.gradient_clip_val == 5.0


def test_autoclip_threshold_follows_the_pre_clip_norms(tmp_path: Path) -> None:
    model = _exploding_mlp()
    callback = GradWatchCallback(auto_fix=("clip_gradients",), auto_fix_probe_steps=5, diagnose_every_n_steps=5,
                                 fix_options={"clip_gradients": {"mode": "autoclip", "percentile": 50.0}}, verbose=False)
    trainer = _trainer(tmp_path, callback)
    trainer.fit(model)
    assert [e.action for e in callback.auto_fix_events] == ["nothing", "clipping"]
    total = callback.to_dataframe().query("layer == '(total)' and metric == 'grad_norm'").set_index("step")["value"]
    # seeded with the norms the diagnosis saw, then each step's pre-clip norm: the median of steps 0..7
    assert trainer.gradient_clip_val == pytest.approx(float(total.median()), rel=1e-4)
    assert model.stepped_norms[6] == pytest.approx(min(total[6], float(total.loc[:6].median())), rel=1e-3)


def test_clipping_is_refused_with_a_reason_where_lightning_cannot_clip(tmp_path: Path) -> None:
    callback = GradWatchCallback(auto_fix=("clip_gradients", "he_init"), verbose=False)
    trainer = _trainer(tmp_path, callback, gradient_clip_val=0.5, max_steps=2)
    trainer.fit(_exploding_mlp())
    [event] = callback.auto_fix_events
    assert event.action == "refused" and "already clips gradients (gradient_clip_val=0.5)" in event.detail
    assert callback.watcher is not None and callback.watcher.auto_fix == ("he_init",)
    assert trainer.gradient_clip_val == 0.5


def test_clipping_state_saved_by_earlier_versions_still_loads() -> None:
    saved = {"mode": "autoclip", "max_norm": 1.0, "percentile": 50.0, "window": 100, "clip_factor": 0.01, "eps": 1e-3,
             "history": [1.0, 3.0], "step": 4, "gradient_clip_val": 2.0, "gradient_clip_algorithm": "norm"}
    clipping = TrainerClipping.from_dict(saved)
    assert clipping.step == 4 and clipping.gradient_clip_val == pytest.approx(2.0) and clipping.seeded
    state = clipping.state_dict()
    assert {k: state[k] for k in saved} == saved
    assert TrainerClipping.from_dict({"mode": "agc", "clip_factor": 0.02}).gradient_clip_val is None


# -- preflight ----------------------------------------------------------------------------------------------
class _OptimizerAtStart(Callback):
    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.groups = [list(g["params"]) for g in trainer.optimizers[0].param_groups]
        self.params = list(pl_module.parameters())


def test_preflight_fixes_a_deep_sigmoid_mlp_before_training(tmp_path: Path) -> None:
    unfixed = GradWatchCallback(verbose=False)
    _trainer(tmp_path, unfixed, max_epochs=2).fit(_sigmoid_mlp())
    assert unfixed.diagnosis is not None and "vanishing" in unfixed.diagnosis.kinds()

    model = _sigmoid_mlp()  # its training_step calls self.log: ignored during the probe
    callback, start = GradWatchCallback(preflight=True, verbose=False), _OptimizerAtStart()
    _trainer(tmp_path, callback, start, max_epochs=2).fit(model)
    result = callback.preflight_result
    assert result is not None and "vanishing" in result.diagnosis.kinds()
    assert [c.fix for c in result.report.applied] == ["insert_batchnorm"]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 7
    # before the optimizer was built: one group holding every parameter, BatchNorms included
    assert len(start.groups) == 1 and {id(p) for p in start.groups[0]} == {id(p) for p in start.params}
    assert len(start.params) == 30
    assert callback.diagnosis is not None and "vanishing" not in callback.diagnosis.kinds()
    assert [r["source"] for r in callback.fix_records] == ["preflight"]
    assert callback.auto_fix_events == []


def test_preflight_with_loss_fn_and_the_dataloader_given_to_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LitNoLoader()  # no train_dataloader: the batch comes from trainer.fit(model, loader)
    callback = GradWatchCallback(preflight=("swap_activation", "he_init"), loss_fn=F.cross_entropy, verbose=False)
    _trainer(tmp_path, callback).fit(model, loader())
    assert callback.preflight_result is not None
    assert [c.fix for c in callback.preflight_result.report.applied] == ["swap_activation", "he_init"]
    assert sum(isinstance(m, nn.ReLU) for m in model.net) == 7 and not any(isinstance(m, nn.Sigmoid) for m in model.net)

    explicit = GradWatchCallback(preflight=("swap_activation",), preflight_batch=next(iter(loader())), verbose=False)
    torch.manual_seed(0)
    _trainer(tmp_path, explicit, max_steps=1).fit(LitNoLoader(), loader())  # training_step returns {"loss": ...}
    assert explicit.preflight_result is not None and explicit.preflight_result.report.changed


def test_resumed_preflight_run_takes_its_structure_from_the_checkpoint(tmp_path: Path) -> None:
    first = GradWatchCallback(preflight=("swap_activation", "he_init"), verbose=False)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _trainer(tmp_path, first, ckpt, enable_checkpointing=True).fit(_sigmoid_mlp())
    [record] = first.fix_records
    assert record["source"] == "preflight"

    # The resumed run's preflight would choose BatchNorm (the default fixes); the checkpoint has ReLUs.
    # No parameter differs between the two structures' Sigmoid/ReLU: only the replay makes it right.
    fresh = _sigmoid_mlp()
    resumed = GradWatchCallback(preflight=True, verbose=False)
    _trainer(tmp_path, resumed, max_epochs=2).fit(fresh, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert not any(isinstance(m, nn.BatchNorm1d | nn.Sigmoid) for m in fresh.modules())
    assert sum(isinstance(m, nn.ReLU) for m in fresh.modules()) == 7
    assert [op["op"] for op in resumed.replayed] == ["replace_activation"] * 7
    assert resumed.fix_records == first.fix_records
    assert math.isfinite(float(resumed.to_dataframe()["value"].dropna().iloc[-1]))


# -- two processes (DDP on gloo) --------------------------------------------------------------------------
def _run_ddp(mode: str, out: Path, timeout: float = 240) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    import json
    import os
    import signal
    import subprocess
    import sys

    script = Path(__file__).resolve().parent / "dist_autofix_script.py"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(script), mode, str(out)], cwd=str(script.parent), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: rank 1 too
        output, _ = proc.communicate()
        pytest.fail(f"{mode} run did not finish in {timeout}s (a rank hangs?)\n{output[-4000:]}")
    assert proc.returncode == 0, output[-6000:]
    return [(json.loads((out / f"rank{r}.json").read_text()), torch.load(out / f"rank{r}.pt", weights_only=True))
            for r in (0, 1)]


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys, and every parameter (and buffer but BatchNorm running statistics) bitwise equal.

    DDP broadcasts rank zero's buffers at the start of every forward, so after the last forward each
    rank's running statistics are those of its own last batch: that is DDP, not a divergence.
    """
    local = ("running_mean", "running_var")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.endswith(local))


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_auto_fix_takes_rank_zeros_decisions_and_keeps_the_ranks_identical(tmp_path: Path) -> None:
    (info0, state0), (info1, state1) = _run_ddp("autofix", tmp_path)
    assert info0["world_size"] == 2 and info0["error"] is None and info1["error"] is None
    assert info0["events"] == info1["events"]  # the same decisions at the same steps
    actions = [(step, action) for step, action, _ in info0["events"]]
    # one change verified at a time: he_init first; clipping only once its verification is over (and only
    # if the gradients still explode)
    assert actions[:3] == [(0, "refused"), (4, "applied"), (7, "kept")]
    assert all(step >= 7 for step, action in actions if action == "clipping")
    refused, applied = info0["events"][0][2], info0["events"][1][2]
    assert refused.startswith("insert_batchnorm: DDPStrategy builds its wrapper over the parameters")
    assert "he_init" in applied and "insert_batchnorm" not in applied
    assert info0["gradient_clip_val"] == info1["gradient_clip_val"]
    # he_init drew different weights on each rank (their random states differ on purpose) ...
    [b0], [b1] = info0["broadcasts"], info1["broadcasts"]
    assert b0["before"] != b1["before"] and b0["copied"] == b1["copied"] > 0
    # ... rank zero's were broadcast, and after 12 more DDP steps every parameter is identical
    assert b0["after"] == b1["after"] == b0["before"]
    assert _identical(state0, state1)
    assert not any("running_mean" in k for k in state0)  # nothing structural was applied


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_preflight_applies_rank_zeros_fixes_on_every_rank(tmp_path: Path) -> None:
    (info0, state0), (info1, state1) = _run_ddp("preflight", tmp_path)
    assert info0["error"] is None and info1["error"] is None
    assert info0["preflight"] == info1["preflight"] and info0["preflight"][0].startswith("[applied] insert_batchnorm")
    assert info0["records"] == info1["records"] == ["preflight"]
    [b0], [b1] = info0["broadcasts"], info1["broadcasts"]
    assert b0["before"] != b1["before"] and b0["after"] == b1["after"]  # each rank had its own initialisation
    assert sum("running_mean" in k for k in state0) == 7
    assert _identical(state0, state1)
