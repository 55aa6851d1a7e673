r"""
The Lightning side of gradwatch's fixes
=======================================

What :class:`~gradwatch.integrations.lightning.GradWatchCallback` needs to apply fixes inside a
``Trainer``: preflight in ``setup()`` (rank zero decides, every rank applies), the auto-fixer's
Lightning variant (the Trainer's own gradient clipping, decisions taken from rank zero, schedulers
told about new parameter groups), and what a resumed run needs (replaying structural changes before
the checkpoint's weights are loaded, the optimizer's parameter groups rebuilt as they were saved).

Facts this relies on (lightning 2.6):

- ``Trainer.fit(ckpt_path=...)``: callback ``setup`` -> ``configure_model`` -> the checkpoint is read
  (only now is ``trainer.ckpt_path`` set) -> ``LightningModule.load_state_dict(strict)`` -> callback
  state -> strategy setup (DDP wrap, ``configure_optimizers``) -> ``on_fit_start`` -> optimizer and
  scheduler states loaded. Structural changes are therefore replayed from a
  ``load_state_dict`` pre-hook registered in ``setup``, and the optimizer's groups are rebuilt in
  ``on_fit_start``, before their saved state is loaded.
- Lightning clips gradients right after ``on_before_optimizer_step``, with ``trainer.gradient_clip_val``
  read at every step: setting it from that hook takes effect on the same step.
- ``torch.optim.lr_scheduler`` zips per-group lists (``base_lrs``...) with the optimizer's groups
  strictly: a group added mid-run must be added to every scheduler of that optimizer.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn

from gradwatch.autofix import STRUCTURAL, AutoFixer, AutoFixEvent
from gradwatch.fixes import FixReport, apply_fixes, replay
from gradwatch.fixes.clipping import agc_, autoclip_threshold, global_norm
from gradwatch.layers import ROOT_NAME, clean_name

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

    from gradwatch.findings import Diagnosis
    from gradwatch.watcher import GradWatcher

log = logging.getLogger(__name__)

#: Scheduler attributes holding one value per parameter group (torch.optim.lr_scheduler).
PER_GROUP_ATTRS: tuple[str, ...] = ("base_lrs", "_last_lr", "lr_lambdas", "max_lrs", "base_momentums",
                                    "max_momentums", "min_lrs")
_NOT_HYPER = ("params", "param_names")

#: Which model instances already carry which records (by record id): a record is applied once per instance.
_APPLIED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


# -- which fixes a strategy allows mid-run ---------------------------------------------------------
def strategy_kind(trainer: Trainer) -> str:
    """``"single"`` (one process, no wrapper), ``"ddp"`` (replicated parameters behind a DDP wrapper) or
    ``"sharded"`` (FSDP, ModelParallel/DTensor, DeepSpeed, or any other multi-process strategy)."""
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy | FSDPStrategy | ModelParallelStrategy):
        return "sharded"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    return "sharded" if trainer.world_size > 1 else "single"


def mid_run_refusals(trainer: Trainer, pl_module: LightningModule, allowed: Sequence[str]) -> dict[str, str]:
    """``{fix name: why it is refused mid-run here}`` for the fixes in ``allowed`` this Trainer cannot take."""
    kind = strategy_kind(trainer)
    name = type(trainer.strategy).__name__
    out: dict[str, str] = {}
    structural = [f for f in allowed if f in STRUCTURAL]
    if structural and kind != "single":
        why = (f"{name} builds its wrapper over the parameters that exist when training starts: modules added "
               "mid-run would train unsynchronised (or not at all) on each process")
        for fix in structural:
            out[fix] = why
    if "he_init" in allowed and kind == "sharded":
        out["he_init"] = f"{name} holds sharded parameters: re-initialising them needs the full tensors"
    if "clip_gradients" in allowed:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if not pl_module.automatic_optimization:
            out["clip_gradients"] = ("manual optimization: Lightning does not clip for you; call "
                                     "self.clip_gradients(optimizer, gradient_clip_val=1.0) in training_step")
        elif kind == "sharded":
            out["clip_gradients"] = (f"{name} clips (or not) by its own configuration, fixed when training starts; "
                                     "set Trainer(gradient_clip_val=...) instead")
        elif scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            out["clip_gradients"] = ("a fused optimizer under 16-mixed unscales inside step(): Lightning cannot clip "
                                     "its gradients")
        elif trainer.gradient_clip_val:
            out["clip_gradients"] = (f"the Trainer already clips gradients (gradient_clip_val={trainer.gradient_clip_val!r}); "
                                     "left to it")
    return out


# -- agreeing across processes -------------------------------------------------------------------------
def from_rank_zero(trainer: Trainer, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on global rank zero only and give its result to every rank; an exception on rank zero
    is raised on every rank (no rank is left waiting in a collective)."""
    if trainer.world_size <= 1:
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if trainer.is_global_zero:
        try:
            outcome = (True, fn())
        except Exception as exc:  # re-raised below, on every rank
            outcome = (False, f"{type(exc).__name__}: {exc}")
    ok, value = trainer.strategy.broadcast(outcome, src=0)
    if not ok:
        raise RuntimeError(f"gradwatch: failed on rank zero: {value}")
    return value


def agree(trainer: Trainer, value: Any) -> Any:
    """Rank zero's ``value`` on every rank (a broadcast); ``value`` itself in one process."""
    return trainer.strategy.broadcast(value, src=0) if trainer.world_size > 1 else value


def touched_prefixes(report: FixReport) -> set[str]:
    """Module paths whose parameters or buffers the applied changes of ``report`` created or rewrote."""
    out: set[str] = set()
    for change in report.applied:
        out.update(change.layers)
        out.update(op["path"] for op in change.ops)
    return out


@torch.no_grad()
def broadcast_modules(trainer: Trainer, module: nn.Module, prefixes: Iterable[str]) -> int:
    """Copy rank zero's parameters and buffers under ``prefixes`` (module paths, clean names) to every rank.

    A collective: every rank must call it. Tensors travel through the host (``strategy.broadcast``
    pickles them), so it works before the model reaches its device and with any backend.

    Returns:
        How many tensors were copied.
    """
    prefixes = set(prefixes)
    every = bool(prefixes & {"", ROOT_NAME})
    local = module.state_dict()
    keys = [k for k in local if every or any(clean_name(k) == p or clean_name(k).startswith(p + ".") for p in prefixes)]
    payload = {k: local[k].detach().cpu() for k in keys} if trainer.is_global_zero else None
    payload = trainer.strategy.broadcast(payload, src=0)
    for key, value in payload.items():
        local[key].copy_(value)
    return len(payload)


def structure_fingerprint(module: nn.Module) -> str:
    """The module tree (names and classes) and parameter shapes, to check that every rank built the same model."""
    parts = [f"{n}:{type(m).__name__}" for n, m in module.named_modules()]
    parts += [f"{n}:{tuple(p.shape)}" for n, p in module.named_parameters()]
    return "|".join(parts)


# -- preflight ---------------------------------------------------------------------------------------
def loss_of(output: Any) -> torch.Tensor:
    """The loss in what ``training_step`` returned: a tensor, or a dict's ``"loss"``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    raise TypeError(
        f"gradwatch preflight: training_step returned {type(output).__name__}, not a loss tensor or a dict with "
        "'loss'; pass GradWatchCallback(loss_fn=...) (called as loss_fn(pl_module(inputs), target))"
    )


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def training_step_as_forward(pl_module: LightningModule) -> Iterator[None]:
    """``pl_module(batch)`` runs ``training_step(batch, 0)`` and returns its loss, with ``self.log`` silenced.

    The redirection Lightning's strategies do to run ``training_step`` through a wrapper: the module's
    own ``__call__`` (and so its forward hooks) runs around ``training_step``, and the real ``forward``
    is back in place while ``training_step`` runs (it may call ``self(x)``).
    """
    names = ("forward", "log", "log_dict")
    saved = {n: pl_module.__dict__[n] for n in names if n in pl_module.__dict__}

    def restore_forward() -> None:
        pl_module.__dict__.pop("forward", None)
        if "forward" in saved:
            pl_module.__dict__["forward"] = saved["forward"]

    def redirected(batch: Any) -> torch.Tensor:
        restore_forward()
        try:
            return loss_of(pl_module.training_step(batch, 0))
        finally:
            object.__setattr__(pl_module, "forward", redirected)

    object.__setattr__(pl_module, "forward", redirected)
    object.__setattr__(pl_module, "log", _no_log)
    object.__setattr__(pl_module, "log_dict", _no_log)
    try:
        yield
    finally:
        for n in names:
            pl_module.__dict__.pop(n, None)
        pl_module.__dict__.update(saved)


def first_train_batch(trainer: Trainer, pl_module: LightningModule) -> Any:
    """One batch from the training data, as ``training_step`` would receive it (on the model's device).

    Where it comes from: the datamodule's ``train_dataloader()``, else the LightningModule's, else the
    dataloaders passed to ``trainer.fit`` (Lightning's fit-loop data source).
    """
    from lightning.pytorch.utilities.model_helpers import is_overridden

    datamodule = trainer.datamodule
    if datamodule is not None and is_overridden("train_dataloader", datamodule):
        loaders = datamodule.train_dataloader()
    elif is_overridden("train_dataloader", pl_module):
        loaders = pl_module.train_dataloader()
    else:
        source = getattr(trainer.fit_loop, "_data_source", None)  # dataloaders passed to trainer.fit(...)
        if source is None or not source.is_defined():
            raise RuntimeError("no training dataloader to draw a batch from")
        loaders = source.dataloader()
    if isinstance(loaders, list | tuple | dict):
        from lightning.pytorch.utilities import CombinedLoader

        combined = CombinedLoader(loaders, mode="max_size_cycle")
        iter(combined)
        batch = next(combined)[0]
    else:
        batch = next(iter(loaders))
    return batch


def to_module_device(pl_module: LightningModule, batch: Any) -> Any:
    """Run the module's batch-transfer hooks, as Lightning does before ``training_step``."""
    param = next(pl_module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batch = pl_module.on_before_batch_transfer(batch, 0)
    batch = pl_module.transfer_batch_to_device(batch, device, 0)
    return pl_module.on_after_batch_transfer(batch, 0)


class TreeSnapshot:
    """The module tree of a model (children, parameter and buffer tables), without copying values.

    Undoes structural changes made in ``setup`` when a checkpoint is loaded after all: its weights
    overwrite every value, so only the tree has to be put back.
    """

    def __init__(self, model: nn.Module) -> None:
        self._tables = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in model.modules()]

    def restore(self) -> None:
        for module, children, params, buffers in self._tables:
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)


# -- records ------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def plain(data: Any) -> Any:
    """``data`` as plain JSON-able Python (what checkpoints may hold under ``weights_only=True``)."""
    return json.loads(json.dumps(data, default=_jsonable))


def new_record(source: str, step: int | None, report: FixReport) -> dict[str, Any]:
    """A fix record as kept in the callback state: ``{"id", "source", "step", "report"}``."""
    return {"id": uuid.uuid4().hex, "source": source, "step": step, "report": plain(report.to_dict())}


def mark_applied(module: nn.Module, record: dict[str, Any], applied: bool = True) -> None:
    ids = _APPLIED.setdefault(module, set())
    if applied:
        ids.add(record["id"])
    else:
        ids.discard(record["id"])


def is_applied(module: nn.Module, record: dict[str, Any]) -> bool:
    return record.get("id") in _APPLIED.get(module, set())


def structural(record: dict[str, Any]) -> bool:
    """True when the record changed the module tree (so a fresh model needs it replayed)."""
    return any(c.get("status") == "applied" and c.get("structural") for c in record.get("report", {}).get("changes", []))


def changes_parameters(record: dict[str, Any]) -> bool:
    return any(c.get("status") == "applied" and (c.get("params_added") or c.get("params_removed"))
               for c in record.get("report", {}).get("changes", []))


def replay_records(module: nn.Module, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replay the structural changes of ``records`` not yet applied to this instance; returns the ops applied.

    Raises:
        RuntimeError: a record does not fit the model, naming the record.
    """
    from gradwatch.fixes import RecordError

    ops: list[dict[str, Any]] = []
    for record in records:
        if is_applied(module, record):
            continue
        if structural(record):
            try:
                ops.extend(replay(module, record["report"]))
            except RecordError as err:
                raise RuntimeError(
                    f"gradwatch could not rebuild the structure recorded by {record.get('source')} at step "
                    f"{record.get('step')}: {err}. Is the model the same class, built with the same arguments, "
                    "as the one the record was made on?"
                ) from None
        mark_applied(module, record)
    return ops


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


# -- optimizer groups and schedulers -----------------------------------------------------------------------
def hyper(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's hyperparameters (everything but its parameters)."""
    return {k: v for k, v in group.items() if k not in _NOT_HYPER}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        try:
            return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))
        except (RuntimeError, TypeError):
            return False
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return a is b


def source_groups(optimizer: torch.optim.Optimizer, n_before: int) -> list[int]:
    """For each group added after the first ``n_before``, the index of the older group it copied
    (``add_param_group`` with the hyperparameters of the replaced layer's group): the first with equal
    hyperparameters, else 0."""
    old = [hyper(g) for g in optimizer.param_groups[:n_before]]
    out = []
    for group in optimizer.param_groups[n_before:]:
        new = hyper(group)
        match = next((j for j, h in enumerate(old) if h.keys() == new.keys() and all(_same(h[k], new[k]) for k in h)), 0)
        out.append(match)
    return out


def schedulers_of(trainer: Trainer, optimizer: torch.optim.Optimizer) -> list[Any]:
    return [cfg.scheduler for cfg in trainer.lr_scheduler_configs if getattr(cfg.scheduler, "optimizer", None) is optimizer]


def resize_scheduler(scheduler: Any, n_before: int, n_after: int, sources: Sequence[int]) -> list[str]:
    """Make a scheduler's per-group lists fit ``n_after`` groups: groups added after ``n_before`` take the
    values of their source group (``sources``), removed ones are dropped. Returns the attributes changed."""
    changed: list[str] = []
    for inner in getattr(scheduler, "_schedulers", None) or ():  # SequentialLR, ChainedScheduler
        changed += resize_scheduler(inner, n_before, n_after, sources)
    for attr in PER_GROUP_ATTRS:
        values = getattr(scheduler, attr, None)
        if not isinstance(values, list) or len(values) != n_before or n_before == n_after:
            continue
        if n_after > n_before:
            values = values + [values[j] for j in sources]
        else:
            values = values[:n_after]
        setattr(scheduler, attr, values)
        changed.append(f"{type(scheduler).__name__}.{attr}")
    return changed


def fit_schedulers(trainer: Trainer, optimizer: torch.optim.Optimizer, n_before: int,
                   sources: Sequence[int] | None = None) -> list[str]:
    """Resize every scheduler of ``optimizer`` from ``n_before`` groups to its current number of groups."""
    n_after = len(optimizer.param_groups)
    if n_after == n_before:
        return []
    if sources is None:
        sources = source_groups(optimizer, n_before) if n_after > n_before else []
    changed: list[str] = []
    for scheduler in schedulers_of(trainer, optimizer):
        changed += resize_scheduler(scheduler, n_before, n_after, sources)
    return changed


def param_layout(optimizer: torch.optim.Optimizer, module: nn.Module) -> list[list[str]] | None:
    """The optimizer's parameter groups as lists of parameter names (``None`` if a parameter has no name)."""
    names = {id(p): n for n, p in module.named_parameters()}
    layout = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    return None if any(n is None for names_ in layout for n in names_) else layout  # type: ignore[return-value]


def regroup(optimizer: torch.optim.Optimizer, module: nn.Module, layout: list[list[str]]) -> tuple[int, list[int]] | None:
    """Rebuild the optimizer's groups as ``layout`` (parameter names per group, as saved with a checkpoint).

    For a resumed run whose ``configure_optimizers`` put the parameters that fixes added into the
    user's groups, while the saved optimizer kept them in groups of their own: its saved state can
    only be loaded into the same layout. Hyperparameters come from the saved state when it loads.

    Returns:
        ``(groups before, source group of each added group)``, or ``None`` when nothing changed or the
        optimizer holds other parameters than the layout (left alone, with a warning).
    """
    current = param_layout(optimizer, module)
    if current == layout:
        return None
    flat_now = sorted(n for names in (current or []) for n in names)
    flat_saved = sorted(n for names in layout for n in names)
    if current is None or flat_now != flat_saved:
        log.warning("gradwatch: the optimizer's parameters differ from those saved in the checkpoint; its groups are "
                    "left as configure_optimizers built them")
        return None
    by_name = dict(module.named_parameters())
    holder = {n: i for i, names in enumerate(current) for n in names}
    groups = optimizer.param_groups
    rebuilt, sources = [], []
    for i, names in enumerate(layout):
        if i < len(groups):
            base, src = groups[i], i
        else:
            src = holder[names[0]] if names else 0
            base = groups[src]
            sources.append(src)
        group = {k: (v if i < len(groups) else copy.deepcopy(v)) for k, v in hyper(base).items()}
        group["params"] = [by_name[n] for n in names]
        if "param_names" in base:
            group["param_names"] = list(names)
        rebuilt.append(group)
    n_before = len(groups)
    optimizer.param_groups[:] = rebuilt
    return n_before, sources


# -- clipping through the Trainer -------------------------------------------------------------------------
class TrainerClipping:
    """Gradient clipping chosen by the auto-fixer, carried out by the ``Trainer`` (``gradient_clip_val``).

    ``"norm"``: a fixed threshold. ``"autoclip"``: the threshold is a percentile of the global norms seen
    (recomputed at every step from ``on_before_optimizer_step``, before Lightning clips). ``"agc"``:
    Lightning has no unit-wise clipping, so :func:`gradwatch.fixes.clipping.agc_` runs in
    ``on_before_optimizer_step`` (after the statistics are read) instead.
    """

    def __init__(self, mode: str, max_norm: float = 1.0, percentile: float = 10.0, window: int | None = 10_000,
                 clip_factor: float = 0.01, eps: float = 1e-3, history: Iterable[float] = (), step: int | None = None):
        self.mode = mode
        self.max_norm = float(max_norm)
        self.percentile = float(percentile)
        self.window = window
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self.history: deque[float] = deque((float(v) for v in history if math.isfinite(float(v))), maxlen=window)
        self.step = step
        #: False when the Trainer keeps a clipping value of its own (set by the user).
        self.active = False
        #: The seed history already holds the current step's norm (it comes from the diagnosis).
        self.seeded = bool(self.history)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainerClipping:
        keys = ("mode", "max_norm", "percentile", "window", "clip_factor", "eps", "history", "step")
        return cls(**{k: state[k] for k in keys if k in state})

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "max_norm": self.max_norm, "percentile": self.percentile, "window": self.window,
                "clip_factor": self.clip_factor, "eps": self.eps, "history": list(self.history), "step": self.step,
                "gradient_clip_val": self.gradient_clip_val, "gradient_clip_algorithm": "norm"}

    @property
    def gradient_clip_val(self) -> float | None:
        if self.mode == "norm":
            return self.max_norm
        if self.mode == "autoclip":
            value = autoclip_threshold(list(self.history), self.percentile)
            return value if math.isfinite(value) else None
        return None

    @property
    def threshold(self) -> float:
        """What to log as ``clip_threshold``: the norm threshold, or AGC's clip factor."""
        if self.mode == "agc":
            return self.clip_factor
        value = self.gradient_clip_val
        return math.inf if value is None else value

    def install(self, trainer: Trainer) -> str:
        """Set the Trainer's clipping (unless the user set a different value); returns what was done."""
        value = self.gradient_clip_val
        if self.mode == "agc":
            self.active = True
            return f"unit-wise AGC (clip_factor={self.clip_factor:g}) applied in on_before_optimizer_step"
        current = trainer.gradient_clip_val
        if current and not (self.active and self.mode == "autoclip") and not math.isclose(float(current), float(value or 0.0)):
            self.active = False
            return f"the Trainer's own gradient_clip_val={current!r} kept"
        self.active = True
        trainer.gradient_clip_val = value
        trainer.gradient_clip_algorithm = GradClipAlgorithmType.NORM
        return f"Trainer clipping: gradient_clip_val={value!r}, gradient_clip_algorithm='norm'"

    def before_lightning_clips(self, trainer: Trainer, optimizer: Any) -> None:
        """Per-step work, from ``on_before_optimizer_step`` (after gradwatch read the statistics)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        params = [p for group in inner.param_groups for p in group["params"]]
        if self.mode == "autoclip" and self.active:
            grads = [p.grad for p in params if p.grad is not None]
            if self.seeded:
                self.seeded = False
            elif grads:
                norm = float(global_norm(grads))
                if math.isfinite(norm):
                    self.history.append(norm)
            trainer.gradient_clip_val = self.gradient_clip_val
            trainer.gradient_clip_algorithm = GradClipAlgorithmType.NORM
        elif self.mode == "agc":
            agc_(params, self.clip_factor, self.eps)


# -- the auto-fixer inside a Trainer ------------------------------------------------------------------------
class LightningAutoFixer(AutoFixer):
    """:class:`gradwatch.autofix.AutoFixer` for a ``Trainer``.

    - decisions (the diagnosis acted on, the verification verdict, whether to clip) are rank zero's,
      broadcast to every rank at the same step;
    - clipping drives the Trainer's own clipping (:class:`TrainerClipping`) instead of an optimizer
      step pre-hook, which Lightning would run before the gradients exist (inside ``step(closure)``);
    - after a change, ``on_change(step, action, report)`` tells the callback (records, schedulers,
      other ranks).
    """

    def __init__(self, watcher: GradWatcher, allowed: tuple[str, ...], trainer: Trainer,
                 on_change: Callable[[int, str, FixReport | None], None], **kwargs: Any) -> None:
        super().__init__(watcher, allowed, **kwargs)
        self._trainer_ref = weakref.ref(trainer)
        self._on_change = on_change
        self.clipping: TrainerClipping | None = None

    @property
    def trainer(self) -> Trainer:
        trainer = self._trainer_ref()
        assert trainer is not None
        return trainer

    def agree(self, value: Any) -> Any:
        return agree(self.trainer, value)

    def model_changed(self, step: int, action: str, report: Any = None) -> None:
        self._on_change(step, action, report)

    def refuse(self, step: int, refusals: dict[str, str]) -> None:
        """Record the fixes refused for this Trainer (one event)."""
        if refusals:
            self._event(step, "refused", "; ".join(f"{fix}: {why}" for fix, why in refusals.items()))

    def _maybe_clip(self, step: int) -> None:
        w = self.watcher
        if w.optimizer is None:
            return
        diag: Diagnosis = self.agree(w.diagnose())
        if not ({"exploding", "nonfinite"} & diag.kinds()):
            return
        report = apply_fixes(w.model, diag, optimizer=w.optimizer, only=["clip_gradients"], dry_run=True,
                             options=self.options)
        planned = [c for c in report.changes if c.status == "planned"]
        if not planned:
            return
        change = planned[0]
        config = dict(change.details.get("clipper", {}))
        options = dict(change.details.get("options", {}))
        history: list[float] = []
        if config.get("mode") == "autoclip":  # AutoClip's history: the pre-clip global norms recorded so far
            finding = (diag.by_kind("exploding") or diag.by_kind("nonfinite"))[0]
            recorded = finding.evidence.get("total_norm_history") or w.history.view().total_norm
            history = [float(v) for v in recorded if math.isfinite(float(v))]
        self.clipping = TrainerClipping(config.get("mode", "norm"), max_norm=config.get("max_norm", options.get("max_norm") or 1.0),
                                        percentile=options.get("percentile", 10.0), window=options.get("window", 10_000),
                                        clip_factor=options.get("clip_factor", 0.01), history=history, step=step)
        how = self.clipping.install(self.trainer)
        change.status = "applied"
        change.optimizer = how
        change.details["clipper"]["threshold"] = self.clipping.threshold
        report.dry_run = False
        self._clipping = True
        w.set_scalar("clip_threshold", self.clipping.threshold)
        self._on_change(step, "clipping", report)
        self._event(step, "clipping", f"{change.summary()}; {how}", report)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return plain({
            "state": self.state,
            "applied_at": self._applied_at,
            "before_loss": self._before_loss,
            "before_score": self._before_score,
            "before_silent": self._before_silent,
            "kinds": sorted(self._kinds),
            "clipping_decided": self._clipping,
            "clipping": self.clipping.state_dict() if self.clipping is not None else None,
            "events": [e.to_dict() for e in self.events],
        })

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        # the saved events first; those of this run so far (e.g. refusals) after them
        self.events = [_event_from_dict(e) for e in state.get("events", [])] + self.events
        self._applied_at = int(state.get("applied_at", 0))
        self._before_loss = float(state.get("before_loss", math.nan))
        self._before_score = float(state.get("before_score", 0.0))
        self._before_silent = int(state.get("before_silent", 0))
        self._kinds = set(state.get("kinds", []))
        self._clipping = bool(state.get("clipping_decided", self._clipping))
        clipping = state.get("clipping")
        self.clipping = TrainerClipping.from_dict(clipping) if clipping else None
        self.state = str(state.get("state", self.state))
        if self.state == "verifying":
            # The snapshot to roll back to lives in memory, not in checkpoints.
            self.state = "done"
            self._event(step, "kept", "resumed from a checkpoint saved while the fix was being verified: kept without "
                                      "verification (the snapshot to roll back to is not saved in checkpoints)")


def _event_from_dict(data: dict[str, Any]) -> AutoFixEvent:
    report = data.get("report")
    return AutoFixEvent(step=int(data.get("step", 0)), action=str(data.get("action", "")), detail=str(data.get("detail", "")),
                        report=FixReport.from_dict(report) if report else None, evidence=dict(data.get("evidence") or {}))
