"""The stage registry: what a stage kind is, and where kinds are looked up.

A `StageKind` declares a kind's name, its documentation, a typed parameter schema
(`Param`: type, default, range, one-line doc), typed input and output ports, the
resource it mostly uses (`host`, `copy`, `compute`), the edge conditions it can
emit (`full`, `timeout` for the batcher) and an optional `impl`: an import string
"module:attr" of its runtime implementation, filled in by the engine and never
imported here (this module imports no torch).

Third-party packages add kinds through the `agp.stages` entry-point group; each
entry point names a `StageKind`, a list of them, or a function returning either:

    [project.entry-points."agp.stages"]
    my_kind = "my_pkg.stages:MY_KIND"
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Iterable

ENTRY_POINT_GROUP = "agp.stages"

RESOURCES = ("host", "copy", "compute")

# parameter value types
INT, FLOAT, BOOL, STR, ENUM, DURATION, SIZE, LIST_STR = (
    "int", "float", "bool", "str", "enum", "duration", "size", "list[str]")
TYPES = (INT, FLOAT, BOOL, STR, ENUM, DURATION, SIZE, LIST_STR)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()          # a Param default meaning "must be given"
FROM_MODE: Any = "(mode)"            # a Param default meaning "the pipeline's mode decides"


@dataclass(frozen=True)
class Param:
    """One typed parameter of a stage kind. Durations are seconds, sizes bytes."""

    name: str
    type: str                                  # one of TYPES
    default: Any = None                        # None: optional with no value; REQUIRED; FROM_MODE
    doc: str = ""
    choices: tuple[str, ...] = ()              # for enum
    min: float | None = None                   # inclusive bounds, unless min_exclusive
    max: float | None = None
    optional: bool = False                     # None is an allowed effective value (e.g. seed)
    min_exclusive: bool = False                # min itself is not allowed (top_p > 0)
    inherits: str | None = None                # unset in the stage: the pipeline setting of this name
    max_items: int | None = None               # list[str]: at most this many strings
    max_length: int | None = None              # str / list[str]: each at most this many characters

    def in_range(self, value) -> bool:
        """Whether a number lies within [min, max] (or (min, max] with min_exclusive)."""
        if self.min is not None and (value < self.min or (self.min_exclusive and value == self.min)):
            return False
        return self.max is None or value <= self.max

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def type_text(self) -> str:
        if self.type == ENUM:
            return " | ".join(self.choices)
        return self.type


ANY_LABEL = "*"                                # `conditions` of a kind whose items carry any label


@dataclass(frozen=True)
class Port:
    name: str
    type: str                                  # Request, Batch, Tokens, CachedTokens, Generated,
                                               # or a union such as "Request|Generated"

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self.type.split("|"))


@dataclass(frozen=True)
class StageKind:
    name: str
    doc: str
    params: tuple[Param, ...] = ()
    inputs: tuple[Port, ...] = ()
    outputs: tuple[Port, ...] = ()
    resource: str = "host"                     # host | copy | compute
    conditions: tuple[str, ...] = ()           # labels its items carry (`when full`); ANY_LABEL: any word
    impl: str | None = None                    # "module:attr" of the runtime implementation
    passthrough: bool = False                  # outputs the item types it receives (route)
    source: str = field(default="builtin", compare=False)   # builtin or the entry point's name

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def is_source(self) -> bool:
        """A request source: a kind with no inputs."""
        return not self.inputs

    @property
    def is_sink(self) -> bool:
        return not self.outputs

    @property
    def accepts(self) -> frozenset[str]:
        """Item types its inputs take."""
        return frozenset(t for p in self.inputs for t in p.types)

    @property
    def emits(self) -> frozenset[str]:
        """Item types its outputs give (a passthrough kind: whatever it receives of these)."""
        return frozenset(t for p in self.outputs for t in p.types)


class Registry:
    """Stage kinds by name: the built-ins plus those of installed entry points."""

    def __init__(self, kinds: Iterable[StageKind] = (), load_entry_points: bool = True):
        self._kinds: dict[str, StageKind] = {}
        self._load_entry_points = load_entry_points
        self._loaded = False
        self.problems: list[str] = []          # entry points that failed to load, in words
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
                    if k.name in self._kinds and self._kinds[k.name].source == "builtin":
                        raise ValueError(f"kind '{k.name}' is already built in")
                    self.register(_with_source(k, f"entry point {ep.name}"))
            except Exception as exc:           # noqa: BLE001 - a broken plug-in must not break agp
                self.problems.append(f"stage entry point '{ep.name}' ({ep.value}) failed to load: {exc}")

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


def _with_source(kind: StageKind, source: str) -> StageKind:
    from dataclasses import replace
    return replace(kind, source=source)


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
        from .builtin import BUILTIN_KINDS
        _default = Registry(BUILTIN_KINDS)
    return _default


def reset_default_registry() -> None:
    """Forget the process-wide registry (tests that fake entry points use this)."""
    global _default
    _default = None


def get_kind(name: str) -> StageKind | None:
    """The kind named `name` in the process-wide registry, or None."""
    return default_registry().get(name)
