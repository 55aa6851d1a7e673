"""A clean interpreter exit for processes in a gloo process group (any framework)."""

from __future__ import annotations

import atexit
from collections.abc import Callable

_EXIT_HANDLER: list[Callable[[], None]] = []


def destroy_gloo_group_at_exit() -> None:
    """Destroy a gloo default process group at interpreter exit, before finalization (once per process).

    Lightning registers this for NCCL only, Hugging Face's ``Trainer`` not at all. A gloo group left alive
    at exit keeps its worker threads, which may still hold the tensors of the last collective (e.g. the
    ``fail_on`` decision, or DDP's last gradient bucket): releasing one during interpreter finalization
    needs the GIL, the thread is torn down inside a ``noexcept`` destructor, and the process aborts with
    "terminate called without an active exception" (SIGABRT) instead of exiting cleanly. Destroying the
    group while the interpreter is alive joins those threads first.
    """
    import torch.distributed as dist

    if _EXIT_HANDLER or not (dist.is_available() and dist.is_initialized()):
        return
    if "gloo" not in str(dist.get_backend()):
        return

    def destroy() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    _EXIT_HANDLER.append(destroy)
    atexit.register(destroy)


__all__ = ["destroy_gloo_group_at_exit"]
