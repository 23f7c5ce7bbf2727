"""The user's cache folder for what agp builds once and keeps: $XDG_CACHE_HOME/agp (else ~/.cache/agp).

The native kernels' library (engine/native) and the DSL's parser tables (parser.py) live in it.
"""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(*parts: str) -> Path | None:
    """$XDG_CACHE_HOME/agp/<parts>, else ~/.cache/agp/<parts>; None where the user has none. A
    relative XDG_CACHE_HOME is ignored (the XDG spec); "~" stays "~" for a user with no home (a
    container's arbitrary uid and no HOME): then there is no user's cache, not a folder "~"."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "agp", *parts) if os.path.isabs(cache) else None
