"""What a stage kind is: its typed parameters, its ports, its resource and its labels.

Plain frozen dataclasses with no behaviour beyond a few derived properties; the
built-in kinds (stages/builtin.py) and the registry (stages/registry.py) both import
them from here, so neither imports the other's module in a circle. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RESOURCES = ("host", "copy", "compute")

# parameter value types
INT, FLOAT, BOOL, STR, ENUM, DURATION, SIZE, LIST_STR, MAP = (
    "int", "float", "bool", "str", "enum", "duration", "size", "list[str]", "map")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()          # a Param default meaning "must be given"
FROM_MODE: Any = "(mode)"            # a Param default meaning "the pipeline's mode decides"


@dataclass(frozen=True)
class Param:
    """One typed parameter of a stage kind. Durations are seconds, sizes bytes."""

    name: str
    type: str                                  # INT, FLOAT, BOOL, STR, ENUM, DURATION, SIZE, LIST_STR or
                                               # MAP ({name = value, …}: a dict of JSON values by name)
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
    max_total: int | None = None               # list[str]: all together at most this many characters
    nonblank: bool = False                     # list[str]: each string holds a character besides whitespace

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
