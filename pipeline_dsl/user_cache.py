"""The user's cache folder for what agp builds once and keeps: $XDG_CACHE_HOME/agp (else ~/.cache/agp).

The native kernels' library (engine/native) and the DSL's parser tables (parser.py) live in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path


def user_cache(*parts: str) -> Path | None:
    """$XDG_CACHE_HOME/agp/<parts>, else ~/.cache/agp/<parts>; None where the user has none. A
    relative XDG_CACHE_HOME is ignored (the XDG spec); "~" stays "~" for a user with no home (a
    container's arbitrary uid and no HOME): then there is no user's cache, not a folder "~"."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "agp", *parts) if os.path.isabs(cache) else None


def private(st: os.stat_result) -> bool:
    """Whether a folder (its stat) is this user's and no one else may write in it: a place whose
    files may be loaded as code (a pickle, a library)."""
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


@contextlib.contextmanager
def one_at_a_time(folder: Path, name: str):
    """One process at a time in this block, among those naming the same lock file of `folder`:
    processes starting together (a server's replicas, a test run's workers) build once, and never
    read a file another is still writing. Without the lock (a file system that has none) each goes
    on alone."""
    fd = None
    try:
        fd = os.open(folder / name, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)
