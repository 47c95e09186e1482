"""`systemctl reload` (SIGHUP): apply what a running mount can change safely; name the rest.

Reloadable: the catalog refresh intervals, the read and gesture deadlines, the delete
grace period, the inbox settle time, the log level, quotas, `projects` and the `[access]`
table (while there is one before and after: turning access control on or off changes the
kernel mount's options). Each applies from the next request or round on; what is
already open stays open, as with any file permission change. Everything else (store,
cache and spool paths and sizes, chunk and block sizes, S3 client settings, allow_other,
read_only, entry_timeout, log_file, and settings added later unless they are listed
here) is set up once at mount: a change is logged as needing a remount.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from imagefs.config import Settings
from imagefs.errors import InvalidValue

log = logging.getLogger(__name__)


def _configured(daemon: Any, settings: Settings) -> None:
    daemon.namespace.reconfigure(
        [*settings.projects, *(settings.access.projects if settings.access else ())])


def _access(daemon: Any, settings: Settings) -> None:
    daemon.policy.settings = settings.access
    _configured(daemon, settings)


def _log_level(_daemon: Any, settings: Settings) -> None:
    logging.getLogger().setLevel(settings.log_level.upper())


def _set(where: str, setting: str | None = None) -> Callable[[Any, Settings], None]:
    """Set the daemon's attribute `where` (dotted) to the setting (default: its own name)."""
    *parts, attribute = where.split(".")

    def apply(daemon: Any, settings: Settings) -> None:
        target = daemon
        for part in parts:
            target = getattr(target, part)
        if not hasattr(target, attribute):  # a typo here must not go unnoticed
            raise AttributeError(f"{type(target).__name__} has no {attribute}")
        setattr(target, attribute, getattr(settings, setting or attribute))
    return apply


def _nothing(_daemon: Any, _settings: Settings) -> None:
    """Read from daemon.settings wherever it is used."""


# setting -> how a running daemon takes the new value
APPLY: dict[str, Callable[[Any, Settings], None]] = {
    "refresh_interval": _nothing,
    "full_refresh_interval": _set("catalog.full_interval", "full_refresh_interval"),
    "read_timeout": _set("reader.read_timeout"),
    "gesture_timeout": _set("gestures.timeout", "gesture_timeout"),
    "delete_grace": _set("gestures.delete_grace"),
    "settle_time": _set("inbox.committer.settle_time"),
    "log_level": _log_level,
    "quotas": lambda daemon, settings: daemon.quotas.update(settings.quotas),
    "projects": _configured,
    "access": _access,
}


@dataclasses.dataclass
class Outcome:
    applied: list[str]
    remount: list[str]

    def status(self) -> str:
        """One line for systemd's STATUS= and the log."""
        if not self.applied and not self.remount:
            return "reloaded: nothing changed"
        parts = [f"applied {', '.join(self.applied)}"] if self.applied else []
        if self.remount:
            parts.append(f"needs a remount: {', '.join(self.remount)}")
        return f"reloaded: {'; '.join(parts)}"


def _live(old: Settings, new: Settings, key: str) -> bool:
    if key == "access":
        return old.access is not None and new.access is not None
    return key in APPLY


def reload(daemon: Any, new: Settings) -> Outcome:
    """Make `daemon.settings` the new settings where that is safe; the rest stay."""
    if not isinstance(logging.getLevelName(new.log_level.upper()), int):
        raise InvalidValue(f"log_level {new.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    old: Settings = daemon.settings
    changed = [f.name for f in dataclasses.fields(Settings)
               if getattr(old, f.name) != getattr(new, f.name)]
    outcome = Outcome([k for k in changed if _live(old, new, k)],
                      [k for k in changed if not _live(old, new, k)])
    merged = dataclasses.replace(old, **{k: getattr(new, k) for k in outcome.applied})
    for key in outcome.applied:
        APPLY[key](daemon, merged)
    daemon.settings = merged
    return outcome
