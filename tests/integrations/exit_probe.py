"""For the multi-process test scripts: record, at interpreter exit, whether the process group was still alive."""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import torch.distributed as dist


def note_group_at_exit(out: Path) -> None:
    """At exit, add ``group_alive_at_exit`` to this rank's ``<out>/rank<k>.json``. Call it before training:
    handlers run last-registered first, so this one runs after any teardown the callbacks register."""

    def note() -> None:
        path = out / f"rank{int(os.environ.get('LOCAL_RANK', '0'))}.json"
        result = json.loads(path.read_text())
        result["group_alive_at_exit"] = dist.is_available() and dist.is_initialized()
        path.write_text(json.dumps(result))

    atexit.register(note)
