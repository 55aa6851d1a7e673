"""Module paths: look up, replace and spell submodules by their qualified names.

Fixes name modules as ``model.named_modules()`` spells them (``"net.3"``), replace them on
their parent (so the name stays where the module was), and show the user the same change as
Python they can paste (``model.net[3] = nn.ReLU()``). Everything about paths lives here so the
fixes, :func:`~gradwatch.fixes.replay` and the code snippets agree on one spelling.
"""

from __future__ import annotations

import keyword

from torch import nn

from gradwatch.layers import ROOT_NAME, WRAPPER_SEGMENTS

#: The variable name code snippets use for the user's model.
MODEL_VAR = "model"


def _parts(path: str) -> list[str]:
    if path in ("", ROOT_NAME):
        return []
    return path.split(".")


def unwrapped(module: nn.Module) -> nn.Module:
    """The module behind ``torch.compile`` / FSDP / activation-checkpointing wrappers (``module`` itself if
    it is not a wrapper): layer names leave the wrapper segments out (see ``gradwatch.layers.clean_name``)."""
    for _ in range(8):
        inner = next((module._modules[seg] for seg in WRAPPER_SEGMENTS if module._modules.get(seg) is not None), None)
        if inner is None:
            break
        module = inner
    return module


def _wrapper_segments(module: nn.Module, part: str) -> list[str]:
    """The wrapper segments between ``module`` and its child ``part`` (empty when ``part`` is a direct child)."""
    segments: list[str] = []
    for _ in range(8):
        if part in module._modules:
            return segments
        seg = next((seg for seg in WRAPPER_SEGMENTS if module._modules.get(seg) is not None), None)
        if seg is None:
            return segments
        segments.append(seg)
        module = module._modules[seg]  # type: ignore[assignment]
    return segments


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (``""`` or ``"(root)"`` is the model itself).

    Wrappers are looked through: ``"body.0"`` finds the first child of a ``torch.compile``d
    ``body`` (``body._orig_mod.0``), as layer names spell it; the spelling with the wrapper
    segment works too. A path that ends at a wrapper gives the module it wraps (the one that
    holds the children); :func:`set_module` at such a path replaces the wrapper with it.

    Raises:
        LookupError: naming the missing component and the children that do exist there.
    """
    module = model
    walked: list[str] = []
    for part in _parts(path):
        child = module._modules.get(part)
        if child is None:
            module = unwrapped(module)
            child = module._modules.get(part)
        if child is None:
            where = ".".join(walked) or ROOT_NAME
            known = list(module._modules)[:20]
            raise LookupError(
                f"no submodule {path!r} in {type(model).__name__}: {where!r} "
                f"({type(module).__name__}) has no child {part!r}; its children are {known}"
            )
        module = child
        walked.append(part)
    return unwrapped(module)


def has_module(model: nn.Module, path: str) -> bool:
    try:
        get_module(model, path)
    except LookupError:
        return False
    return True


def parent_path(path: str) -> tuple[str, str]:
    """``"net.3"`` -> ``("net", "3")``; the root has no parent."""
    parts = _parts(path)
    if not parts:
        raise ValueError("the model itself has no parent to be replaced on")
    return ".".join(parts[:-1]), parts[-1]


def set_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``path`` on its parent, in place, keeping its name and position.

    The parent is the module that holds the child (behind its wrappers, if any); a wrapper at
    ``path`` itself is replaced together with what it wraps.

    Returns:
        The module that was there before.
    """
    parent_name, key = parent_path(path)
    parent = get_module(model, parent_name)
    get_module(model, path)  # LookupError naming what is missing
    old = parent._modules[key]
    parent.register_module(key, new)
    return old  # type: ignore[return-value]


def expr(path: str, model: nn.Module | None = None) -> str:
    """Python that evaluates to the submodule at ``path`` on a variable named ``model``.

    Integer children of ``nn.Sequential``/``nn.ModuleList`` are indexed (``model.net[3]``),
    ``nn.ModuleDict`` keys subscripted, identifiers become attributes; anything else falls back to
    ``model.get_submodule("...")``. Without ``model`` (or past the part of the tree that exists
    yet, as in a dry run) integer parts are indexed, which is what gradwatch's own
    ``nn.Sequential`` wrappers need.
    """
    out = MODEL_VAR
    module: nn.Module | None = model
    parts = _parts(path)
    for i, part in enumerate(parts):
        if module is not None:  # names leave wrappers out; Python must go through them
            for seg in _wrapper_segments(module, part):
                out += f".{seg}"
                module = module._modules[seg]
        exists = module is not None and part in module._modules
        child = module._modules[part] if exists else None
        if part.isdigit() and (not exists or isinstance(module, nn.Sequential | nn.ModuleList)):
            out += f"[{part}]"
        elif exists and isinstance(module, nn.ModuleDict):
            out += f"[{part!r}]"
        elif part.isidentifier() and not keyword.iskeyword(part):
            out += f".{part}"
        else:
            rest = ".".join(parts[i:])
            return f"{out}.get_submodule({rest!r})"
        module = child
    return out


def assign(path: str, value_code: str, model: nn.Module | None = None) -> str:
    """A Python statement that puts ``value_code`` at ``path`` (e.g. ``model.net[3] = nn.ReLU()``)."""
    target = expr(path, model)
    if ".get_submodule(" in target:
        parent_name, key = parent_path(path)
        return f"{expr(parent_name, model)}.register_module({key!r}, {value_code})"
    return f"{target} = {value_code}"


def renamed(name: str, old_prefix: str, new_prefix: str) -> str:
    """``name`` with the module path ``old_prefix`` moved to ``new_prefix`` (unchanged elsewhere)."""
    if name == old_prefix:
        return new_prefix
    if name.startswith(old_prefix + "."):
        return new_prefix + name[len(old_prefix):]
    return name
