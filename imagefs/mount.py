"""The daemon of one mount: wiring the parts, the trio main loop, background tasks, reload.

mountpoint.py checks and unmounts mountpoints; daemonize.py runs the daemon in the
background and waits for its ready report.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from imagefs import __version__
from imagefs.access import GlancePolicy, OpenPolicy, Policy
from imagefs.admin import PURGEABLE, CatalogAdmin
from imagefs.background import keep_running, periodic
from imagefs.blocking import BlockingCalls
from imagefs.cache import ChunkCache, open_environment
from imagefs.catalog import Catalog
from imagefs.catalog_index import CatalogIndex
from imagefs.catalog_store import CatalogStore
from imagefs.config import Settings
from imagefs.dirlock import DirLock
from imagefs.errors import (ImagefsError, InvalidValue, StoreNotFound, StoreUnavailable,
                            StoreUntrusted)
from imagefs.core import Filesystem
from imagefs.fs import Operations
from imagefs.gestures import Gestures
from imagefs.health import Outcomes, RecentErrors
from imagefs.inbox import Inbox
from imagefs.inbox.entries import STATES
from imagefs.kernel_cache import KernelCache
from imagefs.metadata import Metadata
from imagefs.metrics import MetricsServer
from imagefs.daemonize import failed, report_ready, spawn_daemon
from imagefs.mountinfo import set_read_ahead
from imagefs.mountpoint import check_mountpoint
from imagefs.namespace import Namespace
from imagefs.pinning import CacheControl
from imagefs.quotas import Quotas, Usage, stored_usage
from imagefs.reader import ImageReader
from imagefs.reload import reload
from imagefs.sd_notify import notify, reloading
from imagefs.records import STATUSES
from imagefs.refusals import Refusals
from imagefs.spool import Spool
from imagefs.store_init import init_hint
from imagefs.stores import open_store

log = logging.getLogger(__name__)
_FLUSH_INTERVAL = 2.0
_DRAIN_TIMEOUT = 10.0  # at unmount, how long to wait for chunks still being cached
_REFRESH_TIMEOUT = 120.0  # a refresh stuck longer (a hung NFS store) is abandoned
_SWEEP_INTERVAL = 6 * 3600.0  # how often leftovers of crashes are looked for in the store
_SWEEP_AGE = 86400.0  # objects no manifest names are removed once this old


def _setup_logging(settings: Settings, cache_dir: Path, daemonized: bool) -> Path | None:
    """Log to stderr in the foreground; a daemon logs to a file, stray output included.

    The log file's path, or None for stderr.
    """
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
    return log_file if daemonized else None


def mount(settings: Settings, mountpoint: Path, ready_fd: int | None = None,
          reread: Callable[[], Settings] | None = None) -> int:
    """`imagefs mount`: daemonize unless --foreground; return once the mount is ready.

    `reread`: the settings as the config file now says, for a reload (SIGHUP).
    """
    try:
        check_mountpoint(mountpoint)
        if not settings.foreground:
            return spawn_daemon()
        daemon = Daemon(settings, mountpoint, reread)
        daemon.prepare(daemonized=ready_fd is not None)
    except ImagefsError as exc:
        failed(ready_fd, str(exc))
        raise
    return daemon.run(ready_fd)


class Daemon:
    """Owns the parts of one mount and the trio main loop."""

    def __init__(self, settings: Settings, mountpoint: Path,
                 reread: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.mountpoint = mountpoint
        self._reread = reread
        self._locks: list[DirLock] = []
        self._usage: dict[tuple[int, str], Usage] = {}
        self.started = time.time()
        self.refreshes = Outcomes()
        self.recent = RecentErrors()
        self.metrics: MetricsServer | None = None
        self._token: trio.lowlevel.TrioToken | None = None  # the loop's, once it runs
        self._resolved = str(mountpoint)  # its real path, taken in run() before mounting

    def _lock(self, directory: Path, purpose: str) -> None:
        lock = DirLock(directory, purpose)
        lock.acquire(f"mounted at {self.mountpoint}")
        self._locks.append(lock)

    def prepare(self, daemonized: bool = False) -> None:
        """Everything that can fail with a clear message, before the mount exists."""
        settings = self.settings
        cache_dir = settings.effective_cache_dir()
        try:
            # The daemon's alone: it holds other tenants' data, staged uploads, the catalog
            # (an existing dir keeps its mode; what is in it is made 0700 below).
            cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidValue(f"cache dir {cache_dir}: {exc.strerror}") from None
        self._lock(cache_dir, "cache dir")
        spool_dir = settings.spool_dir or cache_dir / "spool"
        try:
            spool = Spool(spool_dir, settings.spool_size)
        except OSError as exc:
            raise InvalidValue(f"spool dir {spool_dir}: {exc.strerror}") from None
        if settings.spool_dir:
            self._lock(spool_dir, "spool dir")
        self.log_file = _setup_logging(settings, cache_dir, daemonized)
        logging.getLogger().addHandler(self.recent)
        store = open_store(settings.store or "", settings.s3, settings.read_timeout)
        self.env = open_environment(cache_dir, settings.cache_size)
        self.cache = ChunkCache(self.env, settings.cache_size,
                                reuse_gap=settings.cache_reuse_gap)
        self.index = CatalogIndex(self.env, store.url)
        self.catalog_store = CatalogStore(store, self.index.store_id)
        self.catalog = Catalog(self.catalog_store, self.index, settings.full_refresh_interval)
        count = self.catalog.load_cached(crashed=self.index.mark_running())
        try:
            store.check()
            with self.refreshes.track():
                self.catalog.refresh()
        except (StoreUnavailable, StoreNotFound, StoreUntrusted) as exc:
            if not count and not isinstance(exc, StoreUntrusted):
                hint = f"; {init_hint(store.url)}" if isinstance(exc, StoreNotFound) else ""
                raise type(exc)(f"{exc}; and the cache at {cache_dir} holds no catalog "
                                f"to start from{hint}") from None
            log.warning("store cannot be used (%s); serving the cached catalog of %d images "
                        "from %s until it comes back (uploads wait in the inbox, changes "
                        "to images answer EIO)", exc, count, cache_dir)
        self.policy = self._policy()
        self.reader = ImageReader(self.catalog_store, self.index, self.cache,
                                  settings.chunk_size, settings.memory_cache,
                                  settings.prefetch_max, settings.s3.max_connections,
                                  settings.read_timeout)
        self.admin = CatalogAdmin(self.catalog_store)
        self.catalog_calls = BlockingCalls(1)
        self.quotas = Quotas(settings.quotas)
        self.inbox = Inbox(spool, self.catalog_store, settings.block_size,
                           settings.settle_time, on_publish=self.catalog.apply,
                           known_projects=lambda: self.namespace.known_projects(),
                           quotas=self.quotas, stored=self._stored)
        configured = [*settings.projects, *(settings.access.projects if settings.access else ())]
        self.namespace = Namespace(lambda: self.catalog.snapshot, self.policy, configured,
                                   self.inbox)
        self.gestures = Gestures(self.namespace, self.policy, self.admin, self.catalog,
                                 self.inbox, settings.delete_grace, settings.gesture_timeout)
        self.cache_control = CacheControl(self.cache, self.reader, self.policy,
                                          lambda: self.catalog.snapshot.images)
        core = Filesystem(self.namespace, self.policy, self.reader, self.inbox, self.gestures,
                          Metadata(self.policy, self.inbox, self.gestures, self.stats,
                                   self.status, self.cache_control,
                                   Refusals(listener=self.recent.add)),
                          lambda: self.catalog.snapshot.images, (os.getuid(), os.getgid()))
        self.ops = Operations(core, settings.entry_timeout)
        if settings.metrics_listen:
            self.metrics = MetricsServer(settings.metrics_listen, self._status_now,
                                         self.reader.fetch_seconds)

    def _policy(self) -> Policy:
        """Glance's rules with an [access] table; without one, what imagefs always did."""
        settings = self.settings
        if settings.access is not None:
            log.info("access control on: %d projects, %d admin and %d reader entries mapped",
                     len(settings.access.projects), len(settings.access.admins),
                     len(settings.access.readers))
            return GlancePolicy(settings.access)
        log.info("no [access] table in the config: every caller sees every image; only root "
                 "and uid %d change anything (docs/access.md)", os.getuid())
        if settings.allow_other:
            log.warning("--allow-other without an [access] table: every local user can read "
                        "every image through this mount")
        return OpenPolicy(os.getuid())

    def _stored(self, project: str) -> Usage:
        """What the project's images count against its quota (cached per catalog version)."""
        snapshot = self.catalog.snapshot
        key = (snapshot.generation, project)
        cached = self._usage.get(key)
        if cached is None:
            cached = stored_usage((m.record for m in snapshot.images.values()), project)
            self._usage = {k: v for k, v in self._usage.items()
                           if k[0] == snapshot.generation}
            self._usage[key] = cached
        return cached

    def stats(self) -> dict[str, Any]:
        calls = (self.reader.store_calls, self.gestures.store_calls, self.catalog_calls)
        return {**self.reader.stats.as_dict(), "cache_bytes": self.cache.total_bytes(),
                "cache_cap": self.cache.cap, "evicted_bytes": self.cache.evicted_bytes,
                "cache_protected_bytes": self.cache.protected_bytes(),
                "damaged_cache_entries": self.cache.damaged,
                **{f"evictions_{segment}": n for segment, n in self.cache.evictions.items()},
                "images": len(self.catalog.snapshot.images),
                "catalog_generation": self.catalog.snapshot.generation,
                "store_timeouts": sum(c.timeouts for c in calls),
                "stuck_threads": sum(c.stuck for c in calls),
                "abandoned_threads": sum(c.abandoned for c in calls)}

    def status(self) -> dict[str, Any]:
        """What `imagefs status` shows (user.imagefs.daemon) and metrics export.

        Read on the trio thread, which owns the inbox and the counters.
        """
        counters = self.stats()
        by_status = dict.fromkeys(STATUSES, 0)
        for manifest in self.catalog.snapshot.images.values():
            by_status[manifest.record.status] = by_status.get(manifest.record.status, 0) + 1
        by_state = dict.fromkeys(STATES, 0)
        for entry in self.inbox.registry.all():
            by_state[entry.status] += 1
        read, fetched = counters["read_bytes"], counters["store_bytes"]
        committer, refreshes = self.inbox.committer, self.refreshes
        return {
            "mountpoint": str(self.mountpoint), "store": self.catalog_store.store.url,
            "version": __version__, "pid": os.getpid(), "started": self.started,
            "log_file": str(self.log_file) if self.log_file else None,
            "metrics_url": self.metrics.url if self.metrics else None,
            "cache": {"dir": str(self.settings.effective_cache_dir()),
                      "bytes": counters["cache_bytes"], "cap": counters["cache_cap"],
                      # Of the bytes returned to readers, the share not fetched for them
                      # (prefetch may fetch more than is read: never below 0).
                      "hit_ratio": max(1 - fetched / read, 0.0) if read else None},
            "catalog": {"images": counters["images"], "by_status": by_status,
                        "last_refresh": refreshes.last_success,
                        "refresh_age": time.time() - (refreshes.last_success or self.started),
                        "refreshes": refreshes.succeeded, "refresh_failures": refreshes.failed,
                        "last_refresh_error": refreshes.last_error},
            "inbox": {"by_state": by_state,
                      "in_flight": by_state["inspecting"] + by_state["uploading"],
                      "published": committer.published,
                      "published_bytes": committer.published_bytes,
                      "failed": committer.failed, "retried": committer.retried,
                      "staging_bytes": self.inbox.spool.used,
                      "staging_cap": self.inbox.spool.limit},
            "recent_errors": self.recent.lines(),
            "counters": counters,
        }

    def _status_now(self) -> dict[str, Any] | None:
        """The status for a scrape, which runs in a metrics server thread: read on the
        trio thread once the loop runs; None once it has ended (unmounting)."""
        token = self._token
        if token is None:
            return self.status()
        try:
            return trio.from_thread.run_sync(self.status, trio_token=token)
        except trio.RunFinishedError:
            return None

    def run(self, ready_fd: int | None) -> int:
        options = set(pyfuse3.default_options)
        if self.policy.caller_dependent():
            # The rules decide, not mode bits: what a caller may not see must answer
            # ENOENT, and what it may change depends on its projects, not on an owner.
            options.discard("default_permissions")
        # The source as given (escaped for libfuse's option parser): mount(8) compares it
        # with fstab's to tell that an entry is mounted (mount -a).
        fsname = (self.settings.store or "").replace("\\", "\\\\").replace(",", "\\,")
        options |= {f"fsname={fsname}", "subtype=imagefs", "noatime"}
        if self.settings.allow_other:
            options.add("allow_other")
        if self.settings.read_only:
            options.add("ro")
        self._resolved = os.path.realpath(self.mountpoint)  # before it is ours to serve
        try:
            pyfuse3.init(self.ops, str(self.mountpoint), options)
        except RuntimeError as exc:
            if self.metrics:
                self.metrics.close()
            failed(ready_fd, f"cannot mount {self.mountpoint}: {exc}")
            raise InvalidValue(f"cannot mount {self.mountpoint}: {exc}") from None
        log.info("mounted %s at %s (%d images, cache %s, cap %d bytes)", self.settings.store,
                 self.mountpoint, len(self.catalog.snapshot.images),
                 self.settings.effective_cache_dir(), self.settings.cache_size)
        report_ready(ready_fd, "OK")
        notify("READY=1", f"STATUS=mounted {self.settings.store} at {self.mountpoint}")
        try:
            trio.run(self._main)
        finally:
            pyfuse3.close(unmount=True)  # even after a crash: never leave a stale mount
            if self.metrics:
                self.metrics.close()
            # Only abandoned store calls can still be running, and none touches LMDB.
            self.cache.flush_touches()
            self.index.mark_stopped()
            self.env.sync(True)
            self.env.close()
            self.catalog_store.store.close()
            for lock in self._locks:
                lock.release()
            log.info("unmounted %s", self.mountpoint)
        return 0

    def _interval(self) -> float:
        return self.settings.refresh_interval  # read each round: a reload may change it

    async def _main(self) -> None:
        interval = self._interval
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.reader.start(nursery)
            nursery.start_soon(periodic, "catalog refresh", interval, self._refresh)
            nursery.start_soon(periodic, "scrubber", interval, self._scrub)
            nursery.start_soon(periodic, "store sweep", _SWEEP_INTERVAL, self._sweep)
            nursery.start_soon(periodic, "cache bookkeeping", _FLUSH_INTERVAL, self._flush)
            nursery.start_soon(periodic, "cache pins", interval, self.cache_control.keep)
            nursery.start_soon(keep_running, "inbox committer", self.inbox.run)
            nursery.start_soon(keep_running, "kernel cache invalidation",
                               KernelCache(lambda: self.catalog.snapshot,
                                           self.namespace.kernel_cached).run)
            nursery.start_soon(self._signal_loop)
            if self.settings.read_ahead:
                nursery.start_soon(self._tune_read_ahead)
            await pyfuse3.main()
            notify("STOPPING=1", f"STATUS=unmounting {self.mountpoint}")
            with trio.move_on_after(_DRAIN_TIMEOUT):
                await self.reader.drain()
            nursery.cancel_scope.cancel()

    async def _tune_read_ahead(self) -> None:
        """Widen the kernel's readahead once the mount is up: the kernel sets it when the
        daemon answers FUSE's INIT, which a stat of the mount waits for."""
        try:
            await trio.to_thread.run_sync(os.stat, self._resolved, abandon_on_cancel=True)
        except OSError as exc:  # unmounted meanwhile: nothing to tune, nothing to crash
            log.info("readahead of %s left as it is: %s", self.mountpoint, exc)
            return
        if set_read_ahead(self._resolved, self.settings.read_ahead):
            log.info("readahead of %s: %d KiB", self.mountpoint, self.settings.read_ahead >> 10)
        else:
            log.info("could not set the readahead of %s (not root?): the kernel's default "
                     "stays", self.mountpoint)

    async def _refresh(self) -> None:
        with self.refreshes.track():
            changes = await self.catalog_calls.run(
                self.catalog.fetch_changes, timeout=_REFRESH_TIMEOUT, what="catalog refresh")
            await trio.to_thread.run_sync(self.catalog.apply_changes, changes)
        await self.catalog_calls.run(self.catalog.compact, timeout=_REFRESH_TIMEOUT,
                                     what="catalog snapshot")

    async def _scrub(self) -> None:
        """Purge images deleted longer ago than the grace period (any host may do it)."""
        deleted = [m for m in self.catalog.snapshot.images.values()
                   if m.record.status in PURGEABLE]
        if not deleted:
            return
        gone = await self.catalog_calls.run(self.admin.scrub, self.settings.delete_grace,
                                            deleted, timeout=_REFRESH_TIMEOUT, what="scrub")
        for image_id in gone:
            await trio.to_thread.run_sync(self.catalog.forget, image_id)

    async def _sweep(self) -> None:
        """Remove what crashes left in the store (any host may; deletes are idempotent)."""
        removed = await self.catalog_calls.run(self.catalog_store.sweep, _SWEEP_AGE,
                                               timeout=_REFRESH_TIMEOUT, what="store sweep")
        if removed:
            log.info("store sweep removed %d objects left by crashes", removed)

    async def _flush(self) -> None:
        await trio.to_thread.run_sync(self.cache.flush_touches)
        await trio.to_thread.run_sync(self.env.sync, True)

    async def _signal_loop(self) -> None:
        """SIGTERM and SIGINT unmount; SIGHUP (systemctl reload) re-reads the config."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self._reload()
                    continue
                log.info("received %s; unmounting", signal.Signals(signum).name)
                pyfuse3.terminate()
                return

    def _reload(self) -> None:
        reloading()
        try:
            if self._reread is None:
                raise InvalidValue("this mount was not started from a config it can re-read")
            outcome = reload(self, self._reread())
        except ImagefsError as exc:
            log.error("reload failed, the running settings stay: %s", exc)
            status = f"reload failed, the running settings stay: {exc}"
        except Exception as exc:  # a reload must never take the mount down
            log.exception("reload failed unexpectedly; the running settings stay")
            status = f"reload failed, the running settings stay: {exc!r}"
        else:
            status = outcome.status()
            log.info("%s", status)
            if outcome.remount:
                log.warning("%s changed in the config but %s only at mount: the running "
                            "mount keeps the old value until it is remounted (systemctl "
                            "restart)", ", ".join(outcome.remount),
                            "takes effect" if len(outcome.remount) == 1 else "take effect")
        notify("READY=1", f"STATUS={status}")
