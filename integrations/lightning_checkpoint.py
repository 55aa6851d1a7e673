"""Fix records in Lightning checkpoints: reading them, and replaying their structure on a fresh model.

A model changed by a structural fix (``insert_batchnorm``, ``residual``...) cannot load its own
checkpoint into a fresh instance until the change is made again: the records
(:class:`gradwatch.fixes.record.FixRecord`) saved in ``GradWatchCallback``'s state say what to replay.
A record is replayed once per model instance (:func:`mark_applied`).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch.fixes import FixReportError, replay
from gradwatch.fixes.record import FixRecord

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

#: Which model instances already carry which records (by record id): a record is applied once per instance.
_APPLIED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def mark_applied(module: nn.Module, record: FixRecord, applied: bool = True) -> None:
    """Note that ``module`` carries ``record`` (or no longer does)."""
    ids = _APPLIED.setdefault(module, set())
    if applied:
        ids.add(record.id)
    else:
        ids.discard(record.id)


def is_applied(module: nn.Module, record: FixRecord) -> bool:
    return record.id in _APPLIED.get(module, set())


def load_records(data: Iterable[dict[str, Any]]) -> list[FixRecord]:
    """Records as saved in a checkpoint (plain dicts) read back.

    Raises:
        RuntimeError: a malformed record, naming it.
    """
    out = []
    for item in data:
        try:
            out.append(FixRecord.from_dict(item))
        except (TypeError, ValueError) as err:
            raise RuntimeError(f"gradwatch: malformed fix record in the checkpoint ({err})") from None
    return out


def replay_records(module: nn.Module, records: Iterable[FixRecord]) -> list[dict[str, Any]]:
    """Replay the structural changes of ``records`` not yet applied to this instance; returns the ops applied.

    Raises:
        RuntimeError: a record does not fit the model, naming the record.
    """
    ops: list[dict[str, Any]] = []
    for record in records:
        if is_applied(module, record):
            continue
        if record.structural:
            try:
                ops.extend(replay(module, record.report))
            except FixReportError as err:
                raise RuntimeError(
                    f"gradwatch could not rebuild the structure recorded by {record.source} at step "
                    f"{record.step}: {err}. Is the model the same class, built with the same arguments, "
                    "as the one the record was made on?"
                ) from None
        mark_applied(module, record)
    return ops


def checkpoint_records(checkpoint: dict[str, Any], state_key: str | None = None) -> list[FixRecord]:
    """The fix records of the ``GradWatchCallback`` states in a loaded checkpoint, oldest first."""
    return load_records(r for state in gradwatch_states(checkpoint, state_key) for r in state.get("fix_records") or [])


def read_checkpoint(path: str | os.PathLike[str], trainer: Trainer | None = None, trusted: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint's contents; a local file is memory-mapped, so its tensors are not read.

    A directory (a sharded/distributed checkpoint) gives its ``meta.pt`` (where Lightning keeps the
    callback states), or ``{}``. Remote paths and custom checkpoint IO go through the Trainer's
    ``checkpoint_io`` (Lightning's ``TorchCheckpointIO`` without a Trainer). Local files are read
    with ``weights_only=True``; only a ``trusted`` one (Lightning has just loaded it in this run)
    falls back to full unpickling when that refuses its contents.
    """
    if os.path.isdir(path):
        meta = os.path.join(path, "meta.pt")
        return read_checkpoint(meta, trainer, trusted) if os.path.isfile(meta) else {}
    if os.path.isfile(path):
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception:
            if not trusted:
                raise
            # Objects weights_only refuses (or an old, non-zip file): the run loading this checkpoint has
            # just loaded it with Lightning, so it accepted them already.
            return torch.load(path, map_location="cpu", weights_only=False)
    if trainer is not None:
        return trainer.strategy.checkpoint_io.load_checkpoint(path)
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    return TorchCheckpointIO().load_checkpoint(path)


def gradwatch_states(checkpoint: dict[str, Any], state_key: str | None = None) -> list[dict[str, Any]]:
    """The ``GradWatchCallback`` states in a checkpoint: the one under ``state_key`` if present, else all."""
    callbacks = checkpoint.get("callbacks") or {}
    if state_key is not None and isinstance(callbacks.get(state_key), dict):
        return [callbacks[state_key]]
    return [v for k, v in callbacks.items() if str(k).startswith("GradWatchCallback") and isinstance(v, dict)]


def replay_checkpoint(model: torch.nn.Module, checkpoint: str | os.PathLike[str] | dict[str, Any]) -> list[dict[str, Any]]:
    """Rebuild on a fresh model the structure that ``GradWatchCallback`` fixes gave it in a Lightning checkpoint.

    For inference or any use outside ``Trainer.fit``: a checkpoint of a model changed by
    ``preflight`` or ``auto_fix`` has the fixed structure, which a fresh instance lacks.

    Args:
        model: a fresh instance of the LightningModule (or of the module the records were made on).
        checkpoint: the checkpoint's path or its loaded contents.

    Returns:
        The structural ops applied, in order.

    Raises:
        RuntimeError: a record does not fit the model.
        pickle.UnpicklingError: the file holds objects ``torch.load(weights_only=True)`` refuses; pass
            the contents loaded the way you trust instead of the path.

    Example::

        >>> model = LitModel()  # doctest: +SKIP
        >>> replay_checkpoint(model, "last.ckpt")  # doctest: +SKIP
        >>> model.load_state_dict(torch.load("last.ckpt")["state_dict"])  # strict  # doctest: +SKIP
        >>> # the same by hand: a record is a plain dict whose "report" gradwatch.fixes.replay takes
        >>> for record in torch.load("last.ckpt")["callbacks"][key]["fix_records"]:  # doctest: +SKIP
        ...     gradwatch.fixes.replay(model, record["report"])
    """
    data = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    return replay_records(model, checkpoint_records(data))


__all__ = ["checkpoint_records", "gradwatch_states", "is_applied", "load_records", "mark_applied", "read_checkpoint",
           "replay_checkpoint", "replay_records"]
