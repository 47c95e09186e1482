"""`imagefs inbox wait`: what scripts use instead of polling an inbox file themselves."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

from imagefs import xattrs


POLL = 0.2


def _image_id(path: Path) -> str | None:
    try:
        return os.getxattr(path, xattrs.IMAGE_ID).decode()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODATA):
            return None
        raise


def wait_for_upload(path: Path, timeout: float | None) -> int:
    """0 and the image id once published; 1 and the reason if rejected; 2 otherwise."""
    mount_root = path.absolute().parent.parent.parent
    report = path.with_name(path.name + ".error")
    if mount_root.joinpath("inbox") != path.absolute().parent.parent \
            or not path.parent.is_dir():
        print(f"imagefs: error: {path} is not a file in <mount>/inbox/<project>/",
              file=sys.stderr)
        return 2
    image_id = _image_id(path)
    if image_id is None:
        if report.exists():
            sys.stdout.write(report.read_text())
            return 1
        recent = json.loads(os.getxattr(path.parent, xattrs.PUBLISHED) or b"{}")
        if path.name in recent:  # published before we started waiting
            print(recent[path.name])
            return 0
        print(f"imagefs: error: {path} is not waiting in the inbox (already published, or "
              "never written)", file=sys.stderr)
        return 2
    deadline = None if timeout is None else time.monotonic() + timeout
    published = mount_root / "by-id" / image_id
    while path.exists() and _image_id(path) == image_id:
        if deadline is not None and time.monotonic() > deadline:
            status = os.getxattr(path, xattrs.STATUS).decode()
            print(f"imagefs: error: {path} is still {status} after {timeout}s",
                  file=sys.stderr)
            return 2
        time.sleep(POLL)
    if published.exists():
        print(image_id)
        return 0
    if report.exists():
        sys.stdout.write(report.read_text())
        return 1
    print(f"imagefs: error: {path} was removed or renamed before it was published",
          file=sys.stderr)
    return 1
