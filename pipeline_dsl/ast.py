"""The .agp syntax tree: frozen dataclasses, each with a `pos: SourcePos`.

Positions are excluded from equality (`compare=False`), so the tree of a file and
the tree of its formatted text compare equal when they mean the same thing.
Comments are kept on the `Module` (for `agp fmt`), also outside equality.

    Module(file, items=(Use | Pipeline, ...))
    Pipeline(name: Name, body=(Setting | Stage | Chain | Override, ...), base: Name | None)
    Override(stage: Name, name: Name, value)             # gen.max_new_tokens = 16 (derived pipelines)
    Stage(name: Name, kind: Name, placement: Name | None, params=(Param, ...))
    Chain(stages=(Name, ...), condition: Cond | None)      # a -> b -> c when full
    conditions: Label(name), Compare(field=(Name | Key, ...), op, value), BoolOp(op, items), Not(item), Otherwise
    values: Int, Float, Bool, Str, Word, Quantity(number, unit), List(items),
            Map(entries=(Param, ...)) as a setting's or parameter's value only
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .diagnostics import SourcePos


def _pos():
    return field(compare=False, repr=False)


# ---------------------------------------------------------------- values

@dataclass(frozen=True)
class Int:
    value: int
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Float:
    value: float
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Bool:
    value: bool
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Str:
    value: str
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Word:
    """A bare word: an enum value (`prefix`, `balanced`, `cuda:1`)."""

    value: str
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Quantity:
    """A number with a unit as written: `1ms`, `512MiB`, `5xs` (unknown units are checked later)."""

    number: int | float
    unit: str
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class List:
    items: tuple["Value", ...]
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Map:
    """`{top_k = 3, label = "math"}`: names to values, each entry a Param (its name and value with
    their positions). Only a setting's or parameter's value: no map holds a map, no condition one."""

    entries: tuple["Param", ...]
    pos: SourcePos = _pos()


Value = Union[Int, Float, Bool, Str, Word, Quantity, List, Map]


# ---------------------------------------------------------------- statements

@dataclass(frozen=True)
class Name:
    """An identifier with its own position (stage names, kinds, settings, conditions)."""

    text: str
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Setting:
    name: Name
    value: Value
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Param:
    name: Name
    value: Value
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Override:
    """`gen.max_new_tokens = 16` in a derived pipeline: a parameter of the base's stage `gen`."""

    stage: Name
    name: Name
    value: Value
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Stage:
    name: Name
    kind: Name
    placement: Name | None
    params: tuple[Param, ...]
    pos: SourcePos = _pos()


# ---------------------------------------------------------------- edge conditions

@dataclass(frozen=True)
class Label:
    """`when full`: a label the source stage's items carry (the batcher's full/timeout, a
    python stage's returned label)."""

    name: Name
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Key:
    """`["x-tenant"]` after a field: a key in brackets, for keys that are no names. Any value
    parses there; the checker refuses one that is not a string (`headers[3]`)."""

    value: "Value"
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Compare:
    """`when prompt_tokens > 512`, `when metadata.tier == "gold"`, `when headers["x-tenant"] == "a"`."""

    # the field as written: a Name, then a Name per `.KEY` and a Key per `[KEY]`
    # (metadata.tier -> (metadata, tier); headers["x-tenant"] -> (headers, Key("x-tenant")));
    # conditions.field_path gives the path the compiled condition reads
    field: tuple[Union[Name, Key], ...]
    op: str                          # == != < <= > >=
    value: "Value"
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class BoolOp:
    """`a and b`, `a or b` (operands flattened left to right)."""

    op: str                          # "and" | "or"
    items: tuple["Cond", ...]
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Not:
    item: "Cond"
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Otherwise:
    """`a -> b otherwise`: taken when no conditional edge of `a` holds."""

    pos: SourcePos = _pos()


Cond = Union[Label, Compare, BoolOp, Not, Otherwise]


@dataclass(frozen=True)
class Chain:
    """`a -> b -> c when full`: one edge per arrow; the condition applies to each."""

    stages: tuple[Name, ...]
    condition: Cond | None
    pos: SourcePos = _pos()

    def edges(self) -> list[tuple[Name, Name]]:
        return list(zip(self.stages, self.stages[1:]))


BodyItem = Union[Setting, Stage, Chain, Override]


@dataclass(frozen=True)
class Pipeline:
    """`pipeline NAME { … }`, or with `base` (`pipeline short : chat { … }`) a derived one whose
    body holds only settings and overrides. The loader's Program holds derived pipelines
    expanded (loader.derive): the base's stages and edges with the overrides applied."""

    name: Name
    body: tuple[BodyItem, ...]
    pos: SourcePos = _pos()
    base: Name | None = None

    @property
    def settings(self) -> list[Setting]:
        return [b for b in self.body if isinstance(b, Setting)]

    @property
    def stages(self) -> list[Stage]:
        return [b for b in self.body if isinstance(b, Stage)]

    @property
    def chains(self) -> list[Chain]:
        return [b for b in self.body if isinstance(b, Chain)]

    @property
    def overrides(self) -> list[Override]:
        return [b for b in self.body if isinstance(b, Override)]


@dataclass(frozen=True)
class Use:
    path: Str
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Comment:
    text: str                 # with the leading '#'
    pos: SourcePos = _pos()


@dataclass(frozen=True)
class Module:
    """One parsed file."""

    file: str = field(compare=False)
    items: tuple[Union[Use, Pipeline], ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False)

    @property
    def pipelines(self) -> list[Pipeline]:
        return [i for i in self.items if isinstance(i, Pipeline)]

    @property
    def uses(self) -> list[Use]:
        return [i for i in self.items if isinstance(i, Use)]
