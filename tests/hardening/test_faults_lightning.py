"""Faults inside a Lightning ``fit`` with ``GradWatchCallback``: the callback closes its watcher, the
TensorBoard events written so far are readable, and the model and optimizer end up exactly as in the
same faulty run without the callback."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

L = pytest.importorskip("lightning")

from hw_helpers import accumulate, assert_identical, errors, gradwatch_records, state_bits  # noqa: E402
from hw_lit import TRAINER_DEFAULTS, LitNet  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from gradwatch.integrations.lightning import GradWatchCallback  # noqa: E402
from gradwatch.logs import read_run  # noqa: E402

pytestmark = pytest.mark.slow


def _fit(tmp_path: Path, watched: bool, interrupt: bool) -> tuple[dict, GradWatchCallback | None, Path, list]:
    L.seed_everything(0, verbose=False)
    model = LitNet(fail_at=5, interrupt=interrupt)
    cb = GradWatchCallback(activation_every_n_steps=2, histogram_every_n_steps=2, verbose=False) if watched else None
    logger = TensorBoardLogger(str(tmp_path), name="on" if watched else "off")
    trainer = L.Trainer(**{**TRAINER_DEFAULTS, "max_epochs": 2, "callbacks": [cb] if cb else [], "logger": logger})
    expected = SystemExit if interrupt else RuntimeError  # Lightning turns Ctrl-C into a graceful exit(1)
    handler = signal.getsignal(signal.SIGINT)
    with gradwatch_records() as records:
        try:
            with pytest.raises(expected):
                trainer.fit(model)
        finally:
            signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after an interrupt
    return state_bits(model, trainer.optimizers[0]), cb, Path(logger.log_dir), records


@pytest.mark.parametrize("interrupt", [False, True], ids=["exception", "keyboard-interrupt"])
def test_fault_in_training_step_closes_the_watcher_and_keeps_the_logs(tmp_path: Path, interrupt: bool) -> None:
    plain, _, _, _ = _fit(tmp_path, False, interrupt)
    watched, cb, log_dir, records = _fit(tmp_path, True, interrupt)
    assert_identical(plain, watched)
    assert cb is not None and cb.watcher is not None
    assert cb.watcher.closed and cb.watcher.error is None and not errors(records)
    assert [e.step for e in accumulate(log_dir).Scalars("grad_norm/total")] == [0, 1, 2, 3, 4]
    run = read_run(log_dir)
    assert run.problems == [] and run.has_gradwatch_data
    assert run.histogram_tags and run.texts  # histograms and the final diagnosis were flushed
    assert cb.diagnosis is not None  # the diagnosis of what was seen is still available
