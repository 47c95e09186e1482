"""`imagefs cache pin|unpin|drop|status`: a mount's cache, asked for through the mount.

The daemon does the work (pinning.py). The CLI sets `user.imagefs.cache` of an image
file to `pin`, `unpin` or `drop`, and reads it: on an image for its progress, on the
mount root for the whole cache. A refusal reaches the CLI as an errno only, so the
reason is read back from the root's `user.imagefs.last_error` (refusals.py) and printed
as the one line.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagefs import xattrs
from imagefs.config import format_size
from imagefs.errors import ImagefsError, InvalidValue
from imagefs.mountinfo import mount_at
from imagefs.progress import progress_bar

POLL = 0.2  # seconds between looks at a pin's progress


def distinct_images(files: list[str]) -> dict[tuple[int, int], tuple[Path, int]]:
    """(device, inode) -> (path, size): an image is one inode wherever it shows (by-id/,
    public/, tags/...), so an image named twice is worked on once."""
    paths = [Path(p) for p in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InvalidValue(f"not a file: {', '.join(missing)}")
    images: dict[tuple[int, int], tuple[Path, int]] = {}
    for path in paths:
        st = path.stat()
        images.setdefault((st.st_dev, st.st_ino), (path, st.st_size))
    return images


def _mount_root(path: Path) -> Path:
    path = path.absolute()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _last_error(root: Path) -> str | None:
    try:
        return os.getxattr(root, xattrs.LAST_ERROR).decode(errors="replace")
    except OSError:
        return None


def _state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(os.getxattr(path, xattrs.CACHE))
    except OSError as exc:
        raise InvalidValue(f"{path}: not an image on an imagefs mount ({exc.strerror})") \
            from None


def _request(path: Path, action: str,
             progress: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Set the image's `user.imagefs.cache` to `action`; a refusal raises with its reason.

    `progress(state)` is called every POLL seconds while the daemon works (a pin waits
    for the whole image to be cached); Ctrl-C stops the waiting, not the pin.
    """
    root = _mount_root(path)
    before = _last_error(root)
    failure: list[OSError] = []

    def ask() -> None:
        try:
            os.setxattr(path, xattrs.CACHE, action.encode())
        except OSError as exc:
            failure.append(exc)

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    while asking.is_alive():
        asking.join(POLL)
        if progress is not None and asking.is_alive():
            progress(_state(path))
    if failure:
        after = _last_error(root)
        # "<time> setfattr -n user.imagefs.cache image <id>: <ERRNO>: <why>", if it is ours
        why = after.split(": ", 2)[-1] if after and after != before and xattrs.CACHE in after \
            else failure[0].strerror
        raise ImagefsError(f"{path}: {why}")


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def pin(files: list[str]) -> int:
    images = distinct_images(files)
    states = {path: _state(path) for path, _size in images.values()}
    done: list[int] = []
    try:
        with progress_bar(sum(state["size"] for state in states.values()), "pin") as advance:
            for path, state in states.items():
                _pin(path, state, advance)
                done.append(state["size"])
    finally:  # a refusal part-way leaves the images before it pinned: say so
        if done:
            print(f"{_plural(len(done), 'image')} pinned, {sum(done)} bytes cached", flush=True)
    return 0


def _pin(path: Path, state: dict[str, Any], advance: Callable[[int], None]) -> None:
    """Pin one image, the bar following the bytes of it in the cache."""
    size = state["size"]
    shown = min(state["cached_bytes"], size)
    advance(shown)

    def show(now: dict[str, Any]) -> None:
        nonlocal shown
        cached = min(now["cached_bytes"], size)
        if cached > shown:
            advance(cached - shown)
            shown = cached

    _request(path, "pin", show)
    advance(size - shown)


def unpin(files: list[str]) -> int:
    images = distinct_images(files)
    for path, _size in images.values():
        _state(path)  # an image on a mount: never an xattr set on some other file
        _request(path, "unpin")
    print(f"{_plural(len(images), 'image')} unpinned")
    return 0


def drop(files: list[str]) -> int:
    images = distinct_images(files)
    freed = 0
    for path, _size in images.values():
        freed += _state(path)["cached_bytes"]
        _request(path, "drop")
    print(f"{_plural(len(images), 'image')} dropped from the cache, {freed} bytes freed")
    return 0


def status(mountpoint: Path, as_json: bool) -> int:
    try:
        raw = os.getxattr(mountpoint, xattrs.CACHE)
    except OSError as exc:
        from imagefs.mountpoint import FSTYPE

        mounted = mount_at(mountpoint)
        if mounted is None or mounted.fstype != FSTYPE:
            raise InvalidValue(f"{mountpoint} is not an imagefs mountpoint") from None
        if exc.errno == errno.ENODATA:
            raise InvalidValue(f"{mountpoint}: the cache's status is for admins only") \
                from None
        raise InvalidValue(f"{mountpoint}: {exc.strerror}") from None
    doc = json.loads(raw)
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    rows = [("IMAGE", "NAME", "SIZE", "CACHED", "PINNED")]
    rows += [(i["id"], i["name"] or "", format_size(i["size"]), format_size(i["cached_bytes"]),
              "pinned" if i["pinned"] else "") for i in doc["images"]]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"cached {format_size(doc['cache_bytes'])} of the {format_size(doc['cap'])} cap; "
          f"pinned {format_size(doc['pinned_bytes'])} of the {format_size(doc['pin_limit'])} "
          "pins may take")
    if doc["other_bytes"]:
        print(f"{format_size(doc['other_bytes'])} cached of images no longer in the catalog "
              "(they age out)")
    if doc.get("images_left_out"):
        print(f"{doc['images_left_out']} images with less cached are not listed")
    return 0
