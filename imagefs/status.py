"""`imagefs status`: what an operator checks first about each imagefs mount on this host.

It reads what each daemon shows on its mount root as `user.imagefs.daemon` (a JSON
document: Daemon.status in mount.py), so it needs no store access and no config: the
daemon knows its store, cache, catalog, inbox and recent errors. Under an [access]
table only admins see that xattr (docs/access.md).
"""

from __future__ import annotations

import errno
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from imagefs import xattrs
from imagefs.config import format_size
from imagefs.errors import InvalidValue
from imagefs.mountpoint import FSTYPE
from imagefs.mountinfo import mount_at, mounts

ANSWER_WITHIN = 5.0  # seconds a daemon has to show its status; it takes milliseconds
T = TypeVar("T")


def imagefs_mounts() -> list[str]:
    """Every imagefs mountpoint on the host, in the kernel's order."""
    return [entry.mountpoint for entry in mounts() if entry.fstype == FSTYPE]


def read_status(mountpoint: str) -> dict[str, Any]:
    """The daemon's status document, or InvalidValue saying why there is none."""
    entry = mount_at(mountpoint)
    if entry is None or entry.fstype != FSTYPE:
        raise InvalidValue(f"{mountpoint} is not an imagefs mount")
    try:
        return json.loads(os.getxattr(mountpoint, xattrs.DAEMON))
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise InvalidValue(f"{mountpoint}: its daemon died (a stale mount); "
                               f"`imagefs mount` there again cleans it up") from None
        if exc.errno == errno.ENODATA:
            raise InvalidValue(f"{mountpoint}: the daemon shows its status to admins only "
                               "(the [access] table: docs/access.md), or it is older than "
                               "this imagefs") from None
        raise InvalidValue(f"{mountpoint}: {exc.strerror}") from None


def within(seconds: float, what: str, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args), or InvalidValue if it takes longer than `seconds`.

    Any access to a mount whose daemon is stopped or hung blocks in the kernel; the
    thread left there must not keep `imagefs status` (and the other mounts) waiting.
    """
    answer: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def call() -> None:
        try:
            answer.put((True, fn(*args)))
        except BaseException as exc:
            answer.put((False, exc))

    threading.Thread(target=call, name=what, daemon=True).start()
    try:
        ok, result = answer.get(timeout=seconds)
    except queue.Empty:
        raise InvalidValue(f"{what}: the daemon did not answer within {seconds:g}s "
                           "(stopped or hung? its log may say why)") from None
    if not ok:
        raise result
    return result


def run(mountpoint: str | None, as_json: bool, timeout: float = ANSWER_WITHIN) -> int:
    """Print the status of one mount, or of every imagefs mount; 1 if any cannot be read."""
    targets = [os.path.abspath(mountpoint)] if mountpoint else imagefs_mounts()
    if not targets:
        raise InvalidValue("no imagefs mount on this host (mount one: imagefs mount "
                           "--store URL MOUNTPOINT)")
    found: list[dict[str, Any]] = []
    failed = []
    for target in targets:
        try:
            found.append(within(timeout, target, read_status, target))
        except InvalidValue as exc:
            if mountpoint:
                raise
            failed.append(f"imagefs: error: {exc}")
    if as_json:
        print(json.dumps(found[0] if mountpoint else found, indent=2, sort_keys=True))
    elif found:
        print("\n\n".join(format_status(doc) for doc in found))
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


def format_status(doc: dict[str, Any], now: float | None = None) -> str:
    """One aligned `key: value` block."""
    now = time.time() if now is None else now
    cache, catalog, inbox = doc["cache"], doc["catalog"], doc["inbox"]
    counters = doc["counters"]
    ratio = cache["hit_ratio"]
    refreshed = (f"refreshed {_ago(catalog['refresh_age'])} ago"
                 if catalog["last_refresh"] is not None else
                 f"not refreshed since the start {_ago(catalog['refresh_age'])} ago")
    statuses = ", ".join(f"{n} {s}" for s, n in catalog["by_status"].items() if n)
    states = ", ".join(f"{n} {s}" for s, n in inbox["by_state"].items() if n) or "empty"
    failures = str(catalog["refresh_failures"])
    if catalog["last_refresh_error"]:
        failures += f" (last: {catalog['last_refresh_error']})"
    rows = [
        ("mountpoint", doc["mountpoint"]),
        ("store", doc["store"]),
        ("daemon", f"pid {doc['pid']}, imagefs {doc['version']}, "
                   f"up {_ago(now - doc['started'])}"),
        ("cache", f"{format_size(cache['bytes'])} of {format_size(cache['cap'])} "
                  f"({100 * cache['bytes'] / max(cache['cap'], 1):.0f}%) in {cache['dir']}"),
        ("hit ratio", "no reads yet" if ratio is None else
         f"{100 * ratio:.1f}% of {format_size(counters['read_bytes'])} read came from the "
         f"cache ({format_size(counters['store_bytes'])} fetched from the store)"),
        ("catalog", f"{_count(catalog['images'], 'image')}" + (f" ({statuses})" if statuses else "")
                    + f", {refreshed}"),
        ("refresh failures", failures),
        ("inbox", f"{states}; {inbox['in_flight']} uploading now"),
        ("uploads", f"{inbox['published']} published, {inbox['failed']} refused, "
                    f"{inbox['retried']} retried since the start"),
        ("staging", f"{format_size(inbox['staging_bytes'])} of "
                    f"{format_size(inbox['staging_cap'])}"),
        ("read errors", ", ".join(f"{n} {e}" for e, n in
                                  sorted(counters["read_errors"].items()) if n) or "none"),
        ("log file", doc["log_file"] or "stderr (a --foreground mount)"),
        ("metrics", doc["metrics_url"] or "off (set metrics_listen)"),
        ("recent errors", "\n".join(doc["recent_errors"]) or "none"),
    ]
    width = max(len(key) for key, _value in rows) + 2
    lines = []
    for key, value in rows:
        first, *rest = str(value).split("\n")
        lines.append(f"{key + ':':<{width}}{first}")
        lines.extend(" " * width + line for line in rest)
    return "\n".join(lines)


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _ago(seconds: float) -> str:
    """12s, 5m03s, 2h07m, 3d04h."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
