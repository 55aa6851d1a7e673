"""What a fix declares about itself: the one place a fix's facts live.

A fix class states its facts as class attributes (:class:`FixFacts`); the registry, the
diagnosis' reasons, :func:`gradwatch.preflight`, the auto-fixer and the integrations all read
them from there. This module imports neither torch nor the rest of gradwatch, so the registry
built on it stays cheap to query (``Finding`` validates its fix names against it).
"""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

#: What applying a fix changes:
#: ``"structural"`` replaces or wraps submodules (new parameters, new module paths);
#: ``"weights"`` rewrites existing parameters in place (re-initialisation);
#: ``"training"`` changes how training steps (an optimizer step pre-hook: clipping, skipping);
#: ``"advice"`` changes nothing and recommends (a learning rate, a precision).
Effect = Literal["structural", "weights", "training", "advice"]
EFFECTS: tuple[str, ...] = get_args(Effect)


class FixFacts:
    """The facts every fix declares as class attributes; subclasses of ``Fix`` set them.

    Attributes:
        name: the registry name, as ``Finding.fixes`` spells it.
        effect: what applying it changes (see :data:`Effect`).
        kinds: the finding kinds it treats.
        why: why it helps, per finding kind: the reason a diagnosis prints next to it. May hold
            ``str.format`` fields the diagnosis fills from its evidence (``{acts}``, ``{scale}``).
        why_not: why it refuses a finding kind it does not treat, where a kind deserves more than
            "treats ... findings, not ...".
        opt_in: applied only when named (``apply_fixes(only=[...])``, ``auto_fix=[...]``), never
            by the default policy: it changes how training proceeds, not the model.
        preflight: :func:`gradwatch.preflight` applies it by default (it changes the model itself,
            best done before training starts).
        caps_gradients: it bounds the gradient norm of every step; the auto-fixer tries such a fix on
            its own verified cycle, when a finding it treats ranks it.
        structural: derived from ``effect`` (do not set it).
    """

    name: ClassVar[str]
    effect: ClassVar[Effect]
    kinds: ClassVar[tuple[str, ...]] = ()
    why: ClassVar[dict[str, str]] = {}
    why_not: ClassVar[dict[str, str]] = {}
    opt_in: ClassVar[bool] = False
    preflight: ClassVar[bool] = False
    caps_gradients: ClassVar[bool] = False
    structural: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "structural" in vars(cls):
            raise TypeError(f"{cls.__name__} sets `structural`; set `effect` instead (one of {EFFECTS})")
        effect = getattr(cls, "effect", None)
        if effect is not None and effect not in EFFECTS:
            raise TypeError(f"{cls.__name__}.effect={effect!r}; allowed: {EFFECTS}")
        cls.structural = effect == "structural"
