"""`imagefs doctor`: what a mount on this host needs, checked one line at a time.

An operator runs it before the first mount, or when one fails: each line names what was
looked at, and when something is wrong, what to do about it. FAIL is what stops a mount
or its uploads from working; warn is what works today but bites later (a secret others
can read, a clock drifting away from the store's). The checks only read, except for one
probe object written to the store and removed again.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import stat
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefs.config import Settings, config_path, load_settings
from imagefs.config import format_size as _size
from imagefs.errors import (
    ImagefsError,
    InvalidValue,
    StoreAccessDenied,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
)
from imagefs.store_identity import MARKER_KEY, StoreIdentity
from imagefs.store_init import init_hint
from imagefs.stores import Store, open_store
from imagefs.stores.file import FileStore

FUSE_DEVICE = Path("/dev/fuse")
FUSE_CONF = Path("/etc/fuse.conf")
STORE_TIMEOUT = 5.0  # seconds for each store call, retries included
MIN_FREE = 256 << 20  # below this a cache dir is full: LMDB and the spool need room
CLOCK_WARN = 5.0  # seconds off the store's clock: grace periods and ages shift by that
CLOCK_FAIL = 900.0  # S3 refuses requests signed more than 15 minutes off its clock
_SECRET_WORDS = ("secret", "password", "token")

Clock = Callable[[], float]


@dataclass(frozen=True)
class Check:
    status: str  # "ok", "warn", "FAIL" or "skip" (could not be checked: see the line above)
    what: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.what}: {self.detail}"


def run(explicit_config: str | None, overrides: dict[str, Any]) -> list[Check]:
    """Every check, in the order an operator would fix them."""
    path = config_path(explicit_config)
    try:
        settings = load_settings(explicit_config, overrides)
        checks = [config_file(path)]
    except InvalidValue as exc:  # check the rest with defaults and flags
        settings = load_settings(os.devnull, overrides)
        checks = [Check("FAIL", "config", str(exc))]
    checks += [fuse_device(), fusermount(), allow_other(settings.allow_other)]
    checks += directory("cache dir", settings.effective_cache_dir(), settings.cache_size +
                        (0 if settings.spool_dir else settings.spool_size))
    if settings.spool_dir:
        checks += directory("spool dir", settings.spool_dir, settings.spool_size)
    return checks + store_checks(settings)


def exit_status(checks: list[Check]) -> int:
    return 1 if any(c.status == "FAIL" for c in checks) else 0


# -- this host -----------------------------------------------------------------------------

def fuse_device(path: Path = FUSE_DEVICE) -> Check:
    what = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return Check("FAIL", what, "missing: load the fuse module (modprobe fuse); in a "
                                   "container, pass the device in (--device /dev/fuse)")
    if not stat.S_ISCHR(st.st_mode):
        return Check("FAIL", what, "not a character device: FUSE cannot work through it")
    if not os.access(path, os.R_OK | os.W_OK):
        return Check("FAIL", what, f"not readable and writable by uid {os.geteuid()}")
    return Check("ok", what, "character device, readable and writable")


def fusermount() -> Check:
    tool = shutil.which("fusermount3")
    if tool is None:
        return Check("FAIL", "fusermount3", "not on PATH: install fuse3 (apt-get install "
                                            "fuse3); unmounting needs it")
    if os.geteuid() != 0 and not os.stat(tool).st_mode & stat.S_ISUID:
        return Check("FAIL", "fusermount3", f"{tool} is not setuid root, so mounts by users "
                                            "other than root fail (reinstall fuse3)")
    return Check("ok", "fusermount3", tool)


def allow_other(wanted: bool, conf: Path = FUSE_CONF, euid: int | None = None) -> Check:
    what = "allow_other"
    if not wanted:
        return Check("ok", what, "not asked for: only the mounting user can use the mount")
    if (os.geteuid() if euid is None else euid) == 0:
        return Check("ok", what, f"mounting as root, which needs no user_allow_other in {conf}")
    try:
        lines = conf.read_text().splitlines()
    except OSError:
        lines = []
    if "user_allow_other" in (line.strip() for line in lines):
        return Check("ok", what, f"user_allow_other is set in {conf}")
    return Check("FAIL", what, f"asked for, but {conf} has no user_allow_other line, so "
                               "fusermount3 refuses it: add the line (as root), or mount as "
                               "root")


def config_file(path: Path | None) -> Check:
    """A config holding S3 keys must not be readable by every local user."""
    if path is None:
        return Check("ok", "config", "no config file: defaults, flags and boto3's chain")
    with open(path, "rb") as f:  # load_settings has read it already
        secrets = sorted(_secret_keys(tomllib.load(f)))
    mode = path.stat().st_mode
    if secrets and mode & stat.S_IROTH:
        return Check("warn", "config", f"{path} holds {', '.join(secrets)} and every local "
                                       f"user can read it: chmod 600 {path}")
    kept = "holds secrets, readable by its owner" if secrets else "holds no secrets"
    return Check("ok", "config", f"{path} ({kept})")


def _secret_keys(table: dict[str, Any], where: str = "") -> list[str]:
    found = []
    for key, value in table.items():
        name = f"{where}{key}"
        if isinstance(value, dict):
            found += _secret_keys(value, f"{name}.")
        elif any(word in key.lower() for word in _SECRET_WORDS):
            found.append(name)
    return found


def directory(what: str, path: Path, need: int) -> list[Check]:
    """Space and permissions of a dir the daemon writes (created at mount if missing)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [Check("FAIL", what, f"{existing} is not a directory")]
    fs = os.statvfs(existing)
    free = fs.f_bavail * fs.f_frsize
    if fs.f_flag & os.ST_RDONLY:
        space = Check("FAIL", what, f"{path}: {existing} is on a read-only filesystem")
    elif not os.access(existing, os.W_OK | os.X_OK):
        space = Check("FAIL", what, f"{path}: {existing} is not writable by uid "
                                    f"{os.geteuid()}")
    elif free < MIN_FREE:
        space = Check("FAIL", what, f"{path}: only {_size(free)} free on its filesystem: "
                                    "make room, or choose another place")
    elif free + _used(path) < need:
        space = Check("warn", what, f"{path}: {_size(free)} free, but it may grow to "
                                    f"{_size(need)}: make room, or lower cache_size and "
                                    "spool_size")
    else:
        space = Check("ok", what, f"{path}: writable, {_size(free)} free")
    return [space, _permissions(what, path)]


def _permissions(what: str, path: Path) -> Check:
    what = f"{what} permissions"
    if not path.exists():
        return Check("ok", what, f"{path} does not exist yet; the mount creates it (mode 700)")
    st = path.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return Check("warn", what, f"{path} is writable by others, who could replace cached "
                                   f"data or staged uploads: chmod 700 {path}")
    if st.st_uid != os.geteuid():
        return Check("warn", what, f"{path} belongs to uid {st.st_uid}, not to uid "
                                   f"{os.geteuid()} who runs this")
    return Check("ok", what, f"{path}: mode {stat.S_IMODE(st.st_mode):o}")


def _used(path: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                continue
    return total


# -- the store -----------------------------------------------------------------------------

def store_checks(settings: Settings, clock: Clock = time.time) -> list[Check]:
    if not settings.store:
        return [Check("FAIL", "store", "none given: pass --store file:///DIR or "
                                       "s3://BUCKET/PREFIX, or set store in the config")]
    try:
        store = open_store(settings.store, settings.s3, STORE_TIMEOUT)
    except InvalidValue as exc:
        return [Check("FAIL", "store", str(exc))]
    try:
        return _store_checks(store, clock)
    finally:
        store.close()


def _store_checks(store: Store, clock: Clock) -> list[Check]:
    server_times = _server_times(store, clock)  # (store's clock, ours) of each answer
    s3 = server_times is not None
    what = store.url
    try:
        store.check()
    except StoreUnavailable as exc:
        return [Check("FAIL", what, f"does not answer: {exc}")]
    except (StoreAccessDenied, StoreNotFound) as exc:
        hint = f"; {init_hint(store.url)}" if isinstance(exc, StoreNotFound) else ""
        # A clock far off makes S3 refuse a request; its answer still carries its Date.
        return [Check("FAIL", what, f"{exc}{hint}"),
                *([_clock_skew(store, server_times, clock)] if s3 else [])]
    except StoreError as exc:
        return [Check("FAIL", what, str(exc))]
    reached = "reachable, credentials accepted, the bucket exists" if s3 else \
        "the directory exists and is readable"
    return [Check("ok", what, reached), _writable(store), _catalog_marker(store),
            _clock_skew(store, server_times, clock)]


def _writable(store: Store) -> Check:
    key = f".imagefs-doctor-{uuid.uuid4().hex}"  # beside the marker; no folder left
    try:
        store.put(key, b"imagefs doctor")
        store.delete(key)
    except StoreError as exc:
        return Check("FAIL", "store writable", f"cannot write there, so uploads and changes "
                                               f"fail: {exc}")
    return Check("ok", "store writable", "a probe object was written and removed")


def _catalog_marker(store: Store) -> Check:
    try:
        found = StoreIdentity(store).read()
    except ImagefsError as exc:
        return Check("FAIL", "catalog", str(exc))
    if found is None:
        return Check("warn", "catalog", f"no {MARKER_KEY} yet: a new store "
                                        f"({init_hint(store.url)}), or not the bucket or "
                                        "share you meant?")
    return Check("ok", "catalog", f"id {found}")


def _server_times(store: Store, clock: Clock) -> list[tuple[float, float]] | None:
    """For S3: collects the Date header of every answer, errors included; else None."""
    if isinstance(store, FileStore):
        return None
    from imagefs.stores.s3 import S3Store

    assert isinstance(store, S3Store)
    seen: list[tuple[float, float]] = []

    def note(http_response: Any = None, **_: Any) -> None:
        date = http_response.headers.get("Date") if http_response is not None else None
        if date:
            seen.append((email.utils.parsedate_to_datetime(date).timestamp(), clock()))

    store.client.meta.events.register("after-call.s3", note)
    return seen


def _clock_skew(store: Store, server_times: list[tuple[float, float]] | None,
                clock: Clock) -> Check:
    """How far our clock is from the store's: S3's Date header, else a new file's mtime."""
    what = "clock"
    if server_times is None:
        assert isinstance(store, FileStore)
        try:
            with tempfile.NamedTemporaryFile(dir=store.root, prefix=".imagefs-doctor-") as f:
                f.write(b"imagefs doctor")
                f.flush()
                os.fsync(f.fileno())
                offset = clock() - os.fstat(f.fileno()).st_mtime
        except OSError as exc:
            return Check("skip", what, f"cannot write a file in {store.root}: {exc.strerror}")
    elif server_times:
        theirs, ours = server_times[-1]
        offset = ours - theirs
    else:
        return Check("skip", what, "the store sent no Date header")
    return clock_verdict(offset)


def clock_verdict(offset: float) -> Check:
    """`offset`: seconds our clock is ahead of the store's (negative: behind)."""
    said = f"{abs(offset):.1f}s {'ahead of' if offset >= 0 else 'behind'} the store's"
    if abs(offset) > CLOCK_FAIL:
        return Check("FAIL", "clock", f"{said}: S3 refuses requests signed more than 15 "
                                      "minutes off, and delete grace periods and leftover "
                                      "ages are off by as much; run NTP (timedatectl)")
    if abs(offset) > CLOCK_WARN:
        return Check("warn", "clock", f"{said}: delete grace periods and leftover ages are off "
                                      "by as much; run NTP (timedatectl)")
    return Check("ok", "clock", said)
