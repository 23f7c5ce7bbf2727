"""Modes: named presets of stage settings, the seed's memory/compute trade-off.

    mode         precision               max_batch_size  KV budget  compile   where
    efficient    int8 (weight-only)       8               64MiB      false     edge devices
    balanced     auto (bf16 where fast)   32              256MiB     false     cloud servers
    performance  auto                     64              1GiB       true      accelerators

A pipeline picks one with `mode = …` (default `balanced`). The preset fills in the
values of the stage parameters listed here; a stage's own setting in the file
overrides the preset. Effective values: kind default -> mode preset -> file.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MODE = "balanced"

# mode -> (stage kind, parameter) -> value (sizes in bytes, durations in seconds)
PRESETS: dict[str, dict[tuple[str, str], Any]] = {
    "efficient": {
        ("generate", "dtype"): "int8",
        ("generate", "compile"): False,
        ("dynamic_batch", "max_batch_size"): 8,
        ("kv_lookup", "budget"): 64 << 20,
    },
    "balanced": {
        ("generate", "dtype"): "auto",
        ("generate", "compile"): False,
        ("dynamic_batch", "max_batch_size"): 32,
        ("kv_lookup", "budget"): 256 << 20,
    },
    "performance": {
        ("generate", "dtype"): "auto",
        ("generate", "compile"): True,
        ("dynamic_batch", "max_batch_size"): 64,
        ("kv_lookup", "budget"): 1 << 30,
    },
}

MODES = tuple(PRESETS)

def preset(mode: str, kind: str, param: str) -> tuple[bool, Any]:
    """(True, value) when `mode` presets `kind.param`, else (False, None)."""
    table = PRESETS.get(mode, PRESETS[DEFAULT_MODE])
    key = (kind, param)
    if key in table:
        return True, table[key]
    return False, None
