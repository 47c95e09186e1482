"""mount(8)-style options (`-o cache_size=20G,allow_other`): every setting by its config key.

The keys are the fields of `config.Settings` (and `s3.<key>` for the `[s3]` table), read
from the dataclass, so a setting added there is a mount option at once. `config=FILE`
names the config file. mount(8)'s own options are accepted too: `ro` mounts read-only;
the others are mount(8)'s or systemd's business before the helper runs (`noauto`,
`nofail`, `_netdev`, `user`, `x-systemd.*`, ...) or already true of every imagefs mount
(`nosuid`, `nodev`: imagefs serves no setuid bits and no devices; `noatime`), so they
change nothing here. `rw` is what mount(8) passes when `ro` is not given: the config's
`read_only` decides then.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefs.config import S3Settings, Settings, parse_size
from imagefs.errors import InvalidValue

log = logging.getLogger(__name__)

GENERIC = frozenset({
    "defaults", "rw", "ro", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
    "owner", "group", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async", "sync",
    "dirsync", "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime",
    "strictatime", "lazytime", "nolazytime", "silent", "loud"})
# x-*/X-*: comments for systemd and mount(8); user=NAME: added by mount(8) for user mounts.
_GENERIC_PREFIXES = ("x-", "X-", "comment=", "user=")
# Settings that are not mount options, and why.
_NOT_OPTIONS = {
    "store": "the store is the mount's source (the first argument: s3://BUCKET/PREFIX)",
    "mountpoint": "the mountpoint is the mount's target (the second argument)",
    "foreground": "a mount(8) helper returns once the mount is ready",
}
_TRUE = {"", "1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _scalar(hint: Any) -> type | None:
    """str, int, float, bool or Path, also when optional; None for lists and tables."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if hint in (str, int, float, bool, Path) else None


def _keys() -> dict[str, type]:
    """Option key -> the type of its value, from the Settings dataclasses."""
    keys: dict[str, type] = {}
    for prefix, cls in (("", Settings), ("s3.", S3Settings)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _scalar(hints[f.name])
            if kind is not None and f.name not in _NOT_OPTIONS:
                keys[prefix + f.name] = kind
    return keys


@dataclass
class MountOptions:
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # for config.load_settings
    accepted: list[str] = field(default_factory=list)  # the options as given, less ignored


def _value(key: str, kind: type, value: str | None) -> Any:
    if kind is bool:
        word = (value or "").lower()
        if word in _TRUE | _FALSE:
            return word in _TRUE
        raise InvalidValue(f"mount option {key}={value}: expected true or false")
    if not value:
        raise InvalidValue(f"mount option {key} needs a value: {key}=VALUE")
    if kind is int:
        return parse_size(value)
    if kind is float:
        try:
            return float(value)
        except ValueError:
            raise InvalidValue(f"mount option {key}={value}: expected a number") from None
    return value


def parse_options(texts: typing.Iterable[str], sloppy: bool = False) -> MountOptions:
    """Parse comma-separated options; an unknown one raises (with `sloppy`, is skipped)."""
    keys = _keys()
    result = MountOptions()
    for option in (o for text in texts for o in text.split(",") if o):
        name, sep, value = option.partition("=")
        key = name.replace("-", "_")
        if option in GENERIC or option.startswith(_GENERIC_PREFIXES):
            if option == "ro":
                result.overrides["read_only"] = True
                result.accepted.append(option)
            continue
        if key == "config":
            result.config = _value(key, str, value if sep else None)
        elif key in keys:
            converted = _value(key, keys[key], value if sep else None)
            section, _, leaf = key.rpartition(".")
            target = result.overrides.setdefault(section, {}) if section else result.overrides
            target[leaf] = converted
        elif key in _NOT_OPTIONS:
            raise InvalidValue(f"mount option {name}: {_NOT_OPTIONS[key]}")
        elif sloppy:
            log.warning("ignoring unknown mount option %r (sloppy: mount -s)", name)
            continue
        else:
            close = difflib.get_close_matches(key, [*keys, "config"], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            top = sorted(k for k in keys if "." not in k)
            raise InvalidValue(f"unknown mount option {name!r}{hint}; the options are the "
                               f"config keys: config, {', '.join(top)}, s3.KEY for [s3] "
                               "keys, and mount(8)'s own (ro, noauto, nofail, _netdev...)")
        result.accepted.append(option)
    return result
