"""Many small blocking store calls at once, on a few threads (manifests, log entries)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
WORKERS = 8


def parallel(fn: Callable[[K], R | None], items: Iterable[K]) -> dict[K, R]:
    """fn over items on a few threads; items for which fn gives None are left out.

    The first exception raised by fn is raised here, once the others have finished.
    """
    keys = list(dict.fromkeys(items))
    if len(keys) <= 1:
        results = [fn(k) for k in keys]
    else:
        with ThreadPoolExecutor(max_workers=min(WORKERS, len(keys))) as pool:
            results = list(pool.map(fn, keys))
    return {k: r for k, r in zip(keys, results, strict=True) if r is not None}
