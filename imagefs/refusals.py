"""Why the caller's last change was refused, kept where it happened for that caller only.

A FUSE caller gets only an errno ("Operation not permitted"); the reason goes to the
daemon's log, which users of a shared host cannot read. So each refusal is also kept, as
one line, per caller (uid) and folder, and shown as `user.imagefs.last_error` of that
folder — and of the mount root, which holds the caller's latest refusal anywhere
(setfattr on a file included, which names no folder). Per caller, not per project: a
project's members are different users, and a refusal may name what only its caller was
shown (an image id, the access rule that refused it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from imagefs.errors import ImagefsError, errno_name, is_routine
from imagefs.records import iso_time, now_us

Folder = tuple[str, ...]
_KEPT = 4096  # (caller, folder) pairs remembered; the least recently refused go first


class Refusals:
    def __init__(self, kept: int = _KEPT,
                 listener: Callable[[str], None] | None = None) -> None:
        """`listener` gets each refusal as a line for the operator (it names the uid)."""
        self._last: OrderedDict[tuple[int, Folder], str] = OrderedDict()
        self._kept = kept
        self._listener = listener

    def note(self, uid: int, folders: Iterable[Folder], what: str, exc: ImagefsError) -> None:
        """Keep `exc` as the reason `what` (e.g. "rm x.raw") was refused to `uid`."""
        if is_routine(exc):
            return
        when, reason = iso_time(now_us()), f"{what}: {errno_name(exc)}: {exc}"
        line = f"{when} {reason}"
        for folder in {(), *folders}:
            self._last.pop((uid, folder), None)
            self._last[(uid, folder)] = line
        while len(self._last) > self._kept:
            self._last.popitem(last=False)
        if self._listener is not None:
            self._listener(f"{when} REFUSED uid {uid}: {reason}")

    def last(self, uid: int, folder: Folder) -> str | None:
        return self._last.get((uid, folder))
