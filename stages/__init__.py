"""Stage kinds: typed schemas of the pipeline's stages (no torch here).

    from stages import default_registry
    default_registry().get("generate").params

`stages.registry` defines StageKind / Param / Port and the registry (with the
`agp.stages` entry-point group); `stages.builtin` declares the six built-in kinds.
"""

from .registry import (ENTRY_POINT_GROUP, REQUIRED, Param, Port, Registry, StageKind, default_registry,
                       get_kind)

__all__ = ["ENTRY_POINT_GROUP", "REQUIRED", "Param", "Port", "Registry", "StageKind", "default_registry",
           "get_kind"]
