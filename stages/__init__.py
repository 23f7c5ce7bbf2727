"""Stage kinds: typed schemas of the pipeline's stages (no torch here).

    from stages import default_registry
    default_registry().get("generate").params

`stages.schema` defines StageKind / Param / Port, `stages.builtin` the built-in kinds,
`stages.registry` the registry (with the `agp.stages` entry-point group) over both, and
`stages.impl` the kinds' runtime implementations.
"""

from .registry import (ENTRY_POINT_GROUP, REQUIRED, Param, Port, Registry, StageKind, default_registry,
                       get_kind)

__all__ = ["ENTRY_POINT_GROUP", "REQUIRED", "Param", "Port", "Registry", "StageKind", "default_registry",
           "get_kind"]
