"""A python stage's result cache (`cache = N`, `cache_ttl = D`).

Key: the item's dict as canonical JSON (keys sorted) without its `id` and its request's
`id`, so the same content from two requests hits; hashed to 128 bits (BLAKE2b). An item
that is not plain JSON (a custom object in its metadata) is never cached. Value: what the
call made of the item (a label or None, and the dict afterwards), copied in and out, its
ids set to the current item's on a hit. Bound: N entries, the least recently used dropped
first; an entry older than cache_ttl (when > 0) is a miss. Only successful calls are kept.
Items whose content is already being computed wait for that call instead of making their
own (the runtime coalesces them), so a burst of the same content makes one call.
"""
from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from collections import OrderedDict
from typing import Any, Callable


def cache_key(data: dict) -> bytes | None:
    """The content key of an item's dict, or None when it is not plain JSON."""
    view = {k: v for k, v in data.items() if k != "id"}
    req = view.get("request")
    if isinstance(req, dict) and "id" in req:
        view["request"] = {k: v for k, v in req.items() if k != "id"}
    try:
        text = json.dumps(view, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError):
        return None
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ResultCache:
    def __init__(self, size: int, ttl: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.size, self.ttl, self.clock = int(size), float(ttl or 0.0), clock
        self._entries: OrderedDict[bytes, tuple[float, Any, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes | None, data: dict) -> tuple[Any, dict] | None:
        """(label or None, the item's dict) stored under key, with `data`'s ids; None on a miss."""
        if key is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self.ttl and self.clock() - entry[0] > self.ttl:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            label, stored = entry[1], copy.deepcopy(entry[2])
        if "id" in data:
            stored["id"] = data["id"]
        req, mine = stored.get("request"), data.get("request")
        if isinstance(req, dict) and isinstance(mine, dict) and "id" in mine:
            req["id"] = mine["id"]
        return label, stored

    def put(self, key: bytes | None, label: Any, data: dict) -> None:
        if key is None:
            return
        value = copy.deepcopy(data)
        with self._lock:
            self._entries[key] = (self.clock(), label, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
