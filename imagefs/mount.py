"""Mount lifecycle: checks, daemonizing, wiring the parts, refresh loop, clean unmount."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from imagefs.access import OpenPolicy
from imagefs.admin import CatalogAdmin
from imagefs.cache import ChunkCache, open_environment
from imagefs.catalog import Catalog, CatalogIndex, CatalogStore
from imagefs.config import Settings
from imagefs.errors import ImagefsError, InvalidValue, StoreNotFound, StoreUnavailable
from imagefs.fs import Operations
from imagefs.inbox import Inbox
from imagefs.namespace import Namespace
from imagefs.reader import ImageReader
from imagefs.spool import Spool
from imagefs.stores import open_store

log = logging.getLogger(__name__)
_FLUSH_INTERVAL = 2.0
_DRAIN_TIMEOUT = 10.0  # at unmount, how long to wait for chunks still being cached


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def check_mountpoint(path: Path) -> None:
    """Refuse a mountpoint that is missing, not a folder, busy or already mounted."""
    try:
        if _mounted(path):
            raise InvalidValue(f"{path} is already a mountpoint (unmount it first: "
                               f"imagefs umount {path})")
        if not path.is_dir():
            raise InvalidValue(f"mountpoint {path} does not exist or is not a directory "
                               f"(create it: mkdir -p {path})")
        if any(os.scandir(path)):
            raise InvalidValue(f"mountpoint {path} is not empty")
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise InvalidValue(f"{path} is a stale mount (its daemon died); clean it up with "
                               f"imagefs umount {path}") from None
        raise InvalidValue(f"mountpoint {path}: {exc.strerror}") from None


def _setup_logging(settings: Settings, cache_dir: Path, daemonized: bool) -> None:
    """Log to stderr in the foreground; a daemon logs to a file, stray output included."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if daemonized:
        log_file = settings.log_file or cache_dir / "imagefs.log"
        try:
            fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise InvalidValue(f"log file {log_file}: {exc.strerror}") from None
        os.dup2(fd, sys.stdout.fileno())
        os.dup2(fd, sys.stderr.fileno())
        os.close(fd)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())


def mount(settings: Settings, mountpoint: Path, ready_fd: int | None = None) -> int:
    """`imagefs mount`: daemonize unless --foreground; return once the mount is ready."""
    check_mountpoint(mountpoint)
    if not settings.foreground:
        return _spawn_daemon(mountpoint)
    daemon = Daemon(settings, mountpoint)
    try:
        daemon.prepare(daemonized=ready_fd is not None)
    except ImagefsError as exc:
        _report_ready(ready_fd, f"ERR {exc}")
        raise
    return daemon.run(ready_fd)


def _spawn_daemon(mountpoint: Path) -> int:
    """Re-run ourselves in the foreground in a new session; wait for its ready report."""
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "imagefs", *sys.argv[1:], "--foreground",
            "--ready-fd", str(write_fd)]
    with open(os.devnull, "rb") as devnull_in, open(os.devnull, "wb") as devnull_out:
        child = subprocess.Popen(argv, stdin=devnull_in, stdout=devnull_out,
                                 stderr=subprocess.PIPE, pass_fds=(write_fd,),
                                 start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read().decode(errors="replace").strip()
    if report == "OK":
        assert child.stderr is not None
        child.stderr.close()
        return 0
    child.wait(timeout=30)
    assert child.stderr is not None
    err = child.stderr.read().decode(errors="replace").strip()
    message = report[4:] if report.startswith("ERR ") else (err.splitlines() or
                                                            ["daemon exited early"])[-1]
    print(f"imagefs: error: {message.removeprefix('imagefs: error: ')}", file=sys.stderr)
    return 1


def _report_ready(ready_fd: int | None, message: str) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, message.encode() + b"\n")
        os.close(ready_fd)
    except OSError:
        pass


class Daemon:
    """Owns the parts of one mount and the trio main loop."""

    def __init__(self, settings: Settings, mountpoint: Path) -> None:
        self.settings = settings
        self.mountpoint = mountpoint

    def prepare(self, daemonized: bool = False) -> None:
        """Everything that can fail with a clear message, before the mount exists."""
        settings = self.settings
        cache_dir = settings.effective_cache_dir()
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidValue(f"cache dir {cache_dir}: {exc.strerror}") from None
        _setup_logging(settings, cache_dir, daemonized)
        store = open_store(settings.store or "", settings.s3)
        self.env = open_environment(cache_dir, settings.cache_size)
        self.cache = ChunkCache(self.env, settings.cache_size)
        self.index = CatalogIndex(self.env, store.url)
        self.catalog_store = CatalogStore(store)
        self.catalog = Catalog(self.catalog_store, self.index)
        count = self.catalog.load_cached()  # so a refresh only fetches what changed
        try:
            store.check()
            self.catalog.refresh()
        except (StoreUnavailable, StoreNotFound) as exc:
            if not count:
                raise type(exc)(f"{exc}; and the cache at {cache_dir} holds no catalog "
                                "to start from") from None
            log.warning("store cannot be used (%s); serving the cached catalog of %d images "
                        "read-only from %s until it comes back", exc, count, cache_dir)
        if settings.allow_other:
            log.warning("--allow-other: every local user can read every image through this "
                        "mount (per-caller access control is not enforced yet)")
        self.reader = ImageReader(self.catalog_store, self.index, self.cache,
                                  settings.chunk_size, settings.memory_cache,
                                  settings.prefetch_max, settings.s3.max_connections)
        self.admin = CatalogAdmin(self.catalog_store, on_change=self.catalog.apply,
                                  on_purge=self.catalog.forget)
        spool_dir = settings.spool_dir or cache_dir / "spool"
        try:
            spool = Spool(spool_dir, settings.spool_size)
        except OSError as exc:
            raise InvalidValue(f"spool dir {spool_dir}: {exc.strerror}") from None
        self.inbox = Inbox(spool, self.catalog_store, settings.block_size,
                           settings.settle_time, on_publish=self.catalog.apply,
                           known_projects=lambda: self.namespace.known_projects())
        self.namespace = Namespace(lambda: self.catalog.snapshot, OpenPolicy(),
                                   settings.projects, self.inbox)
        self.ops = Operations(self.namespace, self.reader, self.inbox, self.admin,
                              lambda: self.catalog.snapshot.images,
                              settings.entry_timeout, settings.delete_grace, self.stats)

    def stats(self) -> dict[str, Any]:
        return {**self.reader.stats.as_dict(), "cache_bytes": self.cache.total_bytes(),
                "cache_cap": self.cache.cap, "images": len(self.catalog.snapshot.images),
                "catalog_generation": self.catalog.snapshot.generation}

    def run(self, ready_fd: int | None) -> int:
        options = set(pyfuse3.default_options)
        options |= {"fsname=imagefs", "subtype=imagefs", "noatime"}
        if self.settings.allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(self.ops, str(self.mountpoint), options)
        except RuntimeError as exc:
            _report_ready(ready_fd, f"ERR cannot mount {self.mountpoint}: {exc}")
            raise InvalidValue(f"cannot mount {self.mountpoint}: {exc}") from None
        log.info("mounted %s at %s (%d images, cache %s, cap %d bytes)", self.settings.store,
                 self.mountpoint, len(self.catalog.snapshot.images),
                 self.settings.effective_cache_dir(), self.settings.cache_size)
        _report_ready(ready_fd, "OK")
        try:
            trio.run(self._main)
        finally:
            pyfuse3.close(unmount=True)  # even after a crash: never leave a stale mount
            self.cache.flush_touches()
            self.env.sync(True)
            self.env.close()
            self.catalog_store.store.close()
            log.info("unmounted %s", self.mountpoint)
        return 0

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.reader.start(nursery)
            nursery.start_soon(self._refresh_loop)
            nursery.start_soon(self._flush_loop)
            nursery.start_soon(self._signal_loop)
            nursery.start_soon(self.inbox.run)
            await pyfuse3.main()
            with trio.move_on_after(_DRAIN_TIMEOUT):
                await self.reader.drain()
            nursery.cancel_scope.cancel()

    async def _refresh_loop(self) -> None:
        failing = False
        while True:
            await trio.sleep(self.settings.refresh_interval)
            try:
                await trio.to_thread.run_sync(self.catalog.refresh, abandon_on_cancel=True)
                await trio.to_thread.run_sync(self._scrub, abandon_on_cancel=True)
                if failing:
                    log.warning("store is reachable again; catalog refreshes resumed")
                failing = False
            except ImagefsError as exc:
                if not failing:
                    log.warning("catalog refresh failed (%s); serving the last catalog", exc)
                failing = True
            except Exception:
                log.exception("catalog refresh failed unexpectedly")

    def _scrub(self) -> None:
        """Purge images deleted longer ago than the grace period (any host may do it)."""
        deleted = [m for m in self.catalog.snapshot.images.values()
                   if m.record.status == "pending_delete"]
        if deleted:
            self.admin.scrub(self.settings.delete_grace, deleted)

    async def _flush_loop(self) -> None:
        while True:
            await trio.sleep(_FLUSH_INTERVAL)
            try:
                await trio.to_thread.run_sync(self.cache.flush_touches)
                await trio.to_thread.run_sync(self.env.sync, True)
            except Exception:
                log.exception("cache bookkeeping failed")

    async def _signal_loop(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("received %s; unmounting", signal.Signals(signum).name)
                pyfuse3.terminate()
                return


def umount(mountpoint: Path, lazy: bool = False) -> int:
    """`imagefs umount`: unmount and wait (bounded) for the mount to disappear."""
    if not _mounted(mountpoint):
        raise InvalidValue(f"{mountpoint} is not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u"] if tool else ["umount"]
    if lazy:
        command.append("-z")
    result = subprocess.run([*command, str(mountpoint)], capture_output=True, text=True)
    if result.returncode:
        reason = (result.stderr.strip().splitlines() or ["unmount failed"])[-1]
        raise InvalidValue(f"cannot unmount {mountpoint}: {reason} (is a file still open? "
                           "try --lazy)")
    deadline = time.monotonic() + 10
    while _mounted(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    return 0
