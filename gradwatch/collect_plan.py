"""How a list of tensors is reduced: per-layout plans, cached by the collector, and the weight snapshot.

A :class:`ReductionPlan` sorts one device's tensors into *slots* (CPU: large float32 tensors reduced
one by one with BLAS, small ones stacked by shape; accelerators: one ``_foreach_*`` list) and maps
each slot to its layer. A :class:`WeightSnapshot` keeps the weights of the last slow step so the
next collected step can measure the size of the optimizer update.
"""

from __future__ import annotations

import torch

#: CPU: tensors with at least this many elements are reduced one by one with BLAS (a call costs
#: a few microseconds, less than stacking such a tensor would); smaller ones are stacked by shape
#: and reduced together (a shape held by a single tensor is reduced on its own).
BIG = 1 << 12
#: the same where sums are float64 (a BLAS dot of float32 values rounds each square to float32)
BIG_WIDE = 1 << 15


def is_flat_f32(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous()


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` held by this process: the local shard of a DTensor (FSDP2), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def as_real_dense(g: torch.Tensor) -> torch.Tensor:
    """``g`` as a real, dense, local tensor: sparse values, complex magnitudes, a DTensor's shard."""
    g = local_shard(g)  # DTensor shard (FSDP2): statistics of the local shard
    if g.layout != torch.strided:
        g = g.coalesce().values() if g.is_sparse else g.to_dense()
    if g.is_complex():
        g = g.abs()
    return g


class ReductionPlan:
    """How one list of tensors (one device, a fixed set of parameters) is reduced, cached per layout.

    Slots are the tensors in computation order: the ``big`` ones (CPU: one BLAS reduction each),
    then the ``groups`` of equally shaped small ones (stacked), then the ``other`` ones (one
    ``_foreach_norm`` call; everything on accelerators). ``idx[s]`` is the layer of slot ``s``.
    """

    __slots__ = ("big", "groups", "other", "order", "idx", "numel_row", "acc", "positions", "buffers", "all_present")

    def __init__(self, tensors: list[torch.Tensor], positions: list[int], owner: list[int], numel: list[int],
                 n_layers: int, device: torch.device, acc: torch.dtype, batched: bool):
        self.big: list[int] = []
        groups: dict[tuple, list[int]] = {}
        narrow = acc == torch.float32  # float64 sums (a float64 gradient on the device): stack small ones in float64
        self.other: list[int] = []
        for j, t in enumerate(tensors):
            if t.numel() == 0:  # contributes nothing (and has no infinity norm)
                continue
            if not batched:
                self.other.append(j)
            elif is_flat_f32(t) and t.numel() >= (BIG if narrow else BIG_WIDE):
                self.big.append(j)
            elif t.numel() < (BIG if narrow else BIG_WIDE):
                groups.setdefault((tuple(t.shape), t.dtype), []).append(j)
            else:
                self.other.append(j)
        self.groups = []
        for members in groups.values():
            if len(members) == 1 and narrow and is_flat_f32(tensors[members[0]]):
                self.big.append(members[0])  # stacking one tensor would only copy it
            else:
                self.groups.append(members)
        self.order = self.big + [j for grp in self.groups for j in grp] + self.other
        self.positions = [positions[j] for j in self.order]
        idx = torch.tensor([owner[i] for i in self.positions], dtype=torch.long)  # built on the host,
        row = torch.zeros(n_layers, dtype=torch.float64)                         # then moved (no sync)
        row.index_add_(0, idx, torch.tensor([float(numel[i]) for i in self.positions], dtype=torch.float64))
        self.idx = idx.to(device)
        self.numel_row = row.to(device=device, dtype=acc)
        self.all_present = bool((row > 0).all())  # every layer has elements among these tensors
        self.acc = acc
        self.buffers: dict[int, torch.Tensor] = {}  # per group: its stacking buffer (gradients only)

    def stack(self, k: int, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``torch.stack(tensors)`` as ``(len, numel)``, into a buffer kept by the plan: a fresh
        allocation of that size every step costs page faults on CPU (more than the copy itself)."""
        buf = self.buffers.get(k)
        t0 = tensors[0]
        if buf is None or buf.dtype != t0.dtype or buf.device != t0.device:
            buf = self.buffers[k] = torch.empty((len(tensors), *t0.shape), dtype=t0.dtype, device=t0.device)
        try:
            torch.stack(tensors, out=buf)
        except RuntimeError:  # dtypes changed since the plan was made
            return torch.stack(tensors).reshape(len(tensors), -1)
        return buf.view(len(tensors), -1)


class WeightSnapshot:
    """The weights of one device at the last slow-stat step, to measure the next optimizer update."""

    __slots__ = ("key", "wsq", "big", "groups", "other")

    def __init__(self, key: tuple):
        self.key = key                                   # the weight plan's layout
        self.wsq: torch.Tensor | None = None             # per-slot ||w||^2 when taken; None once used
        self.big: list[torch.Tensor | None] = []         # persistent flat buffers (plan.big order)
        self.groups: list[torch.Tensor] = []             # stacked weights (plan.groups order)
        self.other: list[torch.Tensor] = []              # persistent buffers (plan.other order)

