"""Module paths: look up, replace and spell submodules by their qualified names.

Fixes name modules as ``model.named_modules()`` spells them (``"net.3"``), replace them on
their parent (so the name stays where the module was), and show the user the same change as
Python they can paste (``model.net[3] = nn.ReLU()``). Everything about paths lives here so the
fixes, :func:`~gradwatch.fixes.replay` and the code snippets agree on one spelling.
"""

from __future__ import annotations

import keyword

from torch import nn

from gradwatch.layers import ROOT_NAME

#: The variable name code snippets use for the user's model.
MODEL_VAR = "model"


def _parts(path: str) -> list[str]:
    if path in ("", ROOT_NAME):
        return []
    return path.split(".")


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (``""`` or ``"(root)"`` is the model itself).

    Raises:
        LookupError: naming the missing component and the children that do exist there.
    """
    module = model
    walked: list[str] = []
    for part in _parts(path):
        children = module._modules
        child = children.get(part)
        if child is None:
            where = ".".join(walked) or ROOT_NAME
            known = list(children)[:20]
            raise LookupError(
                f"no submodule {path!r} in {type(model).__name__}: {where!r} "
                f"({type(module).__name__}) has no child {part!r}; its children are {known}"
            )
        module = child
        walked.append(part)
    return module


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

    Returns:
        The module that was there before.
    """
    parent_name, key = parent_path(path)
    parent = get_module(model, parent_name)
    old = get_module(model, path)
    parent.register_module(key, new)
    return old


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
