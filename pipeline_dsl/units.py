"""Units: durations (`us`, `ms`, `s`) and sizes (`B`, `KiB`, `MiB`, `GiB`).

Durations normalise to float seconds, sizes to int bytes. `unit_kind("ms")` says
which family a unit belongs to, so the checker can report `5MiB` given to a
duration as a wrong unit, and `5xs` as an unknown one.
"""

from __future__ import annotations

DURATION = "duration"
SIZE = "size"

DURATION_UNITS: dict[str, float] = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
SIZE_UNITS: dict[str, int] = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}

UNIT_NAMES = {DURATION: "us, ms, s", SIZE: "B, KiB, MiB, GiB"}


def unit_kind(unit: str) -> str | None:
    """'duration', 'size' or None for an unknown unit."""
    if unit in DURATION_UNITS:
        return DURATION
    if unit in SIZE_UNITS:
        return SIZE
    return None


# what people write for a unit agp spells otherwise: unit -> (agp's unit, factor to multiply by)
_OTHER_DURATIONS: dict[str, tuple[str, float]] = {
    "ns": ("us", 1e-3), "µs": ("us", 1), "usec": ("us", 1), "msec": ("ms", 1), "sec": ("s", 1),
    "secs": ("s", 1), "second": ("s", 1), "seconds": ("s", 1), "m": ("s", 60), "min": ("s", 60),
    "mins": ("s", 60), "minute": ("s", 60), "minutes": ("s", 60), "h": ("s", 3600), "hr": ("s", 3600),
    "hour": ("s", 3600), "hours": ("s", 3600),
}
_OTHER_SIZES: dict[str, tuple[str, float]] = {
    "b": ("B", 1), "k": ("KiB", 1), "kb": ("KiB", 1), "kib": ("KiB", 1), "m": ("MiB", 1), "mb": ("MiB", 1),
    "mib": ("MiB", 1), "g": ("GiB", 1), "gb": ("GiB", 1), "gib": ("GiB", 1), "tb": ("GiB", 1024),
    "tib": ("GiB", 1024),
}


def respelled(number: float, unit: str, kind: str | None) -> str | None:
    """`5min` in agp's units for a duration (`300s`), `512MB` or `512m` for a size (`512MiB`: the
    budgets agp sizes are binary); None when the unit means nothing known for `kind`."""
    table = {DURATION: _OTHER_DURATIONS, SIZE: _OTHER_SIZES}.get(kind, {})
    other = table.get(unit) or table.get(unit.lower())
    if other is None:
        return None
    agp_unit, factor = other
    value = float(number) * factor
    return f"{int(value) if value.is_integer() else f'{value:g}'}{agp_unit}"


def all_units() -> list[str]:
    return list(DURATION_UNITS) + list(SIZE_UNITS)


def to_seconds(number: float, unit: str) -> float:
    return float(number) * DURATION_UNITS[unit]


def to_bytes(number: float, unit: str) -> int:
    return int(round(float(number) * SIZE_UNITS[unit]))


def normalise(number: float, unit: str) -> float | int:
    """`(1, "ms") -> 0.001`, `(512, "MiB") -> 536870912`."""
    kind = unit_kind(unit)
    if kind == DURATION:
        return to_seconds(number, unit)
    if kind == SIZE:
        return to_bytes(number, unit)
    raise ValueError(f"unknown unit {unit!r}")


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 0.001 -> '1ms', 0.00025 -> '250us'."""
    for unit in ("s", "ms", "us"):
        v = seconds / DURATION_UNITS[unit]
        if abs(v - round(v)) < 1e-9 and round(v) != 0:
            return f"{int(round(v))}{unit}"
    return f"{seconds / 1e-6:g}us" if seconds else "0s"


def format_size(n: int) -> str:
    """1 << 20 -> '1MiB'; 1536 -> '1.5KiB'."""
    for unit in ("GiB", "MiB", "KiB"):
        if n >= SIZE_UNITS[unit] and n % (SIZE_UNITS[unit] // 1024 or 1) == 0:
            v = n / SIZE_UNITS[unit]
            return f"{v:g}{unit}"
    return f"{n}B"
