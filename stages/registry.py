"""The stage registry: where stage kinds are looked up (the built-ins and entry points).

A `StageKind` (stages/schema.py, re-exported here) declares a kind's name, its documentation, a typed parameter schema
(`Param`: type, default, range, one-line doc), typed input and output ports, the
resource it mostly uses (`host`, `copy`, `compute`), the edge conditions it can
emit (`full`, `timeout` for the batcher) and an optional `impl`: an import string
"module:attr" of its runtime implementation, filled in by the engine and never
imported here (this module imports no torch).

Third-party packages add kinds through the `agp.stages` entry-point group; each
entry point names a `StageKind`, a list of them, or a function returning either:

    [project.entry-points."agp.stages"]
    my_kind = "my_pkg.stages:MY_KIND"

Such a kind runs its `process` on workers of its own, as a python stage runs its function, so it
takes the same call policy (`workers`, `timeout`, `retries`, `backoff`: builtin.POLICY_PARAMS)
unless it declares a parameter of that name itself. A kind named as a built-in one, or as a kind
another entry point registered first, is refused alone (the entry point's other kinds register),
as is one whose schema no pipeline can use (_schema_problem).
"""

from __future__ import annotations

import importlib.metadata
from typing import Iterable

from .builtin import BUILTIN_KINDS, POLICY_PARAMS
# the schema's names, importable from here as third-party kinds always have (docs/architecture.md)
from .schema import (ANY_LABEL, BOOL, DURATION, ENUM, FLOAT, FROM_MODE, INT, LIST_STR, MAP,  # noqa: F401
                     REQUIRED, RESOURCES, SIZE, STR, Param, Port, StageKind)

ENTRY_POINT_GROUP = "agp.stages"

__all__ = ["ANY_LABEL", "BOOL", "DURATION", "ENTRY_POINT_GROUP", "ENUM", "FLOAT", "FROM_MODE", "INT", "LIST_STR",
           "MAP", "REQUIRED", "RESOURCES", "SIZE", "STR", "Param", "Port", "Registry", "StageKind", "default_registry",
           "get_kind", "reset_default_registry"]


class Registry:
    """Stage kinds by name: the built-ins plus those of installed entry points."""

    def __init__(self, kinds: Iterable[StageKind] = (), load_entry_points: bool = True):
        self._kinds: dict[str, StageKind] = {}
        self._load_entry_points = load_entry_points
        self._loaded = False
        self.problems: list[str] = []          # entry points that failed to load, in words
        self.shadowed: dict[str, str] = {}     # a kind name an entry point gave again -> that problem
        for k in kinds:
            self.register(k)

    def register(self, kind: StageKind) -> None:
        if not isinstance(kind, StageKind):
            raise TypeError(f"not a StageKind: {kind!r}")
        self._kinds[kind.name] = kind

    def _ensure_loaded(self) -> None:
        if self._loaded or not self._load_entry_points:
            return
        self._loaded = True
        for ep in _entry_points():
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, StageKind):
                    obj = obj()
                kinds = [obj] if isinstance(obj, StageKind) else list(obj)
                for k in kinds:
                    if not isinstance(k, StageKind):
                        raise TypeError(f"{k!r} is not a StageKind")
            except Exception as exc:           # noqa: BLE001 - a broken plug-in must not break agp
                self.problems.append(f"stage entry point '{ep.name}' ({ep.value}) failed to load: {exc}")
                continue
            for k in kinds:
                wrong = _schema_problem(k)
                if wrong is not None:
                    self.problems.append(f"stage entry point '{ep.name}' ({ep.value}): its kind '{k.name}' is not "
                                         f"registered: {wrong}")
                    continue
                taken = self._kinds.get(k.name)
                if taken is not None:           # the first stays: a plug-in never replaces a kind
                    by = "a built-in kind" if taken.source == "builtin" else f"the kind of {taken.source}"
                    problem = (f"stage entry point '{ep.name}' ({ep.value}): its kind '{k.name}' is not "
                               f"registered: '{k.name}' is already {by}")
                    self.problems.append(problem)
                    self.shadowed.setdefault(k.name, problem)
                    continue
                self.register(_third_party(k, f"entry point {ep.name}"))

    def get(self, name: str) -> StageKind | None:
        self._ensure_loaded()
        return self._kinds.get(name)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._kinds)

    def kinds(self) -> list[StageKind]:
        return [self._kinds[n] for n in self.names()]


# the language's reserved words, never a name in a pipeline: the grammar's (pipeline_dsl.parser.keywords(),
# a layer above this one; tests/test_stage_kinds.py holds the two equal)
RESERVED_WORDS = frozenset({"and", "false", "not", "on", "or", "otherwise", "pipeline", "stage", "true", "use", "when"})


def _schema_problem(kind: StageKind) -> str | None:
    """What makes a plug-in's kind unusable, in words: a name no pipeline can write, a resource
    the planner does not know, a default its own parameter refuses. None when it is sound."""
    import re

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", kind.name) or kind.name in RESERVED_WORDS:
        return f"'{kind.name}' is not a name a pipeline can write (a word of letters, digits and _, not a keyword)"
    if kind.resource not in RESOURCES:
        return f"its resource '{kind.resource}' is none of {', '.join(RESOURCES)}"
    for p in kind.params:
        d = p.default
        if p.type == ENUM and not p.choices:
            return f"its enum parameter '{p.name}' has no choices"
        if p.type == ENUM and isinstance(d, str) and d not in p.choices and d != FROM_MODE:
            return f"the default of its parameter '{p.name}', {d!r}, is not one of its choices"
        if p.type in (INT, FLOAT, DURATION, SIZE) and isinstance(d, (int, float)) and not isinstance(d, bool) \
                and not p.in_range(d):
            return f"the default of its parameter '{p.name}', {d!r}, is outside its own range"
    return None


def _third_party(kind: StageKind, source: str) -> StageKind:
    """An entry point's kind: its source, and the call policy of a stage that runs user code
    (workers, timeout, retries, backoff) where it declares no parameter of that name."""
    from dataclasses import replace
    policy = tuple(p for p in POLICY_PARAMS if kind.param(p.name) is None)
    return replace(kind, source=source, params=(*kind.params, *policy))


def _entry_points():
    eps = importlib.metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=ENTRY_POINT_GROUP))
    return list(eps.get(ENTRY_POINT_GROUP, ()))       # Python < 3.10 style mapping


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry: built-ins plus entry points (loaded on first lookup)."""
    global _default
    if _default is None:
        _default = Registry(BUILTIN_KINDS)
    return _default


def reset_default_registry() -> None:
    """Forget the process-wide registry (tests that fake entry points use this)."""
    global _default
    _default = None


def get_kind(name: str) -> StageKind | None:
    """The kind named `name` in the process-wide registry, or None."""
    return default_registry().get(name)
