"""kill -9 of the daemon at chosen moments and at random ones, then `imagefs mount` again.

A crash point wraps one function in the daemon (through Mount's prelude) so that on its
Nth qualifying call the daemon SIGKILLs itself, before or after the call or, with
`within`, in the middle of another one (inside an LMDB write transaction, between a
temp file and its rename...). After the kill the mountpoint is stale (ENOTCONN); the
next `imagefs mount` — the CLI, as a user or systemd would run it, on the same cache
dir and mountpoint — must clean it up and come up. Then, whatever the point:

* the store: every manifest decodes, is active (or pending_delete) and has all of its
  data and block table, with size, md5, sha512 and every block hash right; the CLI lists
  exactly those images and shows each one;
* the mount: every image reads back byte for byte (the source for the ones the test
  made, the store's data for all); images published before the kill are all there;
* the inbox: every file written and closed before the kill is published whole or
  reported as `<name>.error`; nothing is left half-done;
* the cache: after the final umount, LMDB opens and its bookkeeping is consistent (every
  chunk has its LRU entry and size, the total adds up and stays under the cap) — unless
  the daemon logged that it rebuilt a damaged cache;
* the daemon's log after the remount has no traceback;

and each point checks its own outcome (a gesture in progress is applied or not, an upload
in progress is published whole or reported). The quick size runs every point on file://
and a few on S3; IMAGEFS_LONG=1 runs every point on both and more random-time kills.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import msgpack
import pytest
from conftest import LONG, Mount, StoreHandle, make_file, run_cli

from imagefs import manifest as mf
from imagefs.cache import ChunkCache, open_environment
from imagefs.catalog_store import CatalogStore
from imagefs.cli import main as cli_main
from imagefs.config import parse_size
from imagefs.inbox.entries import never_committed
from imagefs.mountinfo import is_mounted
from imagefs.pipeline import upload_image
from imagefs.records import ImageRecord
from imagefs.stores.file import FileStore

MiB = 1 << 20
PROJECT = "acme"
# What every crash test's mount uses unless a point says otherwise: small chunks, so a
# few MiB of images make many cache writes; a fast commit; a short kernel attribute cache,
# so a dead daemon's mount answers ENOTCONN soon (the default is checked on its own).
BASE_SETTINGS: dict[str, Any] = {"settle_time": 0.2, "projects": [PROJECT], "chunk_size": "1M",
                                 "entry_timeout": 0.1}
# Where the daemon's code lives for each store (targets may name "{store}" or "{writer}").
STORE_CLASSES = {"file": ("imagefs.stores.file:FileStore", "imagefs.stores.file:_FileWriter"),
                 "s3": ("imagefs.stores.s3:S3Store", "imagefs.stores.s3:_MultipartWriter")}

# Run in the daemon before it starts: arms the traps. `_arm` wraps a function (sync or
# async) so that its Nth call that passes `cond` (a Python expression over `args` and
# `kwargs`) and happens inside `within` (another function, on the same thread) SIGKILLs
# the daemon before or after the call; `delay` slows every qualifying call down first.
_TRAP_CODE = r'''
import importlib as _il, inspect as _insp, os as _os, signal as _sig, threading as _th
import time as _time
_tls = _th.local()

def _die(label):
    _os.write(2, ("CRASH POINT %s: kill -9 now\n" % label).encode())
    _os.kill(_os.getpid(), _sig.SIGKILL)

def _owner(spec):
    module, _, path = spec.partition(":")
    owner = _il.import_module(module)
    *parents, attr = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, attr

def _inside(spec):
    return getattr(_tls, spec, 0) > 0

def _track(spec):
    owner, attr = _owner(spec)
    real = getattr(owner, attr)
    def tracked(*args, **kwargs):
        setattr(_tls, spec, getattr(_tls, spec, 0) + 1)
        try:
            return real(*args, **kwargs)
        finally:
            setattr(_tls, spec, getattr(_tls, spec, 0) - 1)
    setattr(owner, attr, tracked)

def _arm(label, spec, when, nth, cond, within, delay):
    owner, attr = _owner(spec)
    real = getattr(owner, attr)
    test = eval("lambda args, kwargs: " + cond) if cond else None
    calls = [0]
    lock = _th.Lock()
    def due(args, kwargs):
        if within and not _inside(within):
            return False
        if test is not None and not test(args, kwargs):
            return False
        if delay:
            _time.sleep(delay)
        with lock:
            calls[0] += 1
            return calls[0] == nth
    if _insp.iscoroutinefunction(real):
        async def armed(*args, **kwargs):
            now = due(args, kwargs)
            if now and when == "before":
                _die(label)
            result = await real(*args, **kwargs)
            if now:
                _die(label)
            return result
    else:
        def armed(*args, **kwargs):
            now = due(args, kwargs)
            if now and when == "before":
                _die(label)
            result = real(*args, **kwargs)
            if now:
                _die(label)
            return result
    setattr(owner, attr, armed)
'''


@dataclasses.dataclass(frozen=True)
class Trap:
    """Kill the daemon at the `nth` qualifying call of `target` ("module:Class.attr")."""

    target: str
    when: str = "before"  # or "after" the call returns
    nth: int = 1
    cond: str = ""
    within: str = ""
    delay: float = 0.0

    def code(self, label: str, kind: str) -> str:
        store, writer = STORE_CLASSES[kind]

        def resolve(spec: str) -> str:
            return spec.replace("{store}", store).replace("{writer}", writer)

        lines = [f"_track({resolve(self.within)!r})"] if self.within else []
        lines.append(f"_arm({label!r}, {resolve(self.target)!r}, {self.when!r}, {self.nth}, "
                     f"{self.cond!r}, {resolve(self.within)!r}, {self.delay!r})")
        return "\n".join(lines)


def prelude(label: str, trap: Trap, kind: str) -> str:
    return f"{_TRAP_CODE}\n{trap.code(label, kind)}\n"


# -- the harness ----------------------------------------------------------------------------

@dataclasses.dataclass
class Upload:
    """A file written into the inbox by a test."""

    name: str  # its name now (renames update it)
    data: bytes
    entry_id: str = ""
    closed: bool = False  # close() returned: it must be published or reported
    removing: bool = False  # rm'ed when the daemon died: gone, or still there whole
    renaming_to: str = ""  # mv'ed when the daemon died: under either name


class CrashingMount(Mount):
    """conftest's Mount (prelude and all) at the mountpoint every remount reuses."""

    def __init__(self, store: StoreHandle, root: Path, mountpoint: Path, cache_dir: Path,
                 config: Path, prelude_code: str) -> None:
        super().__init__(store, root, cache_dir=cache_dir, extra=("--config", str(config)),
                         prelude=prelude_code)
        self.path.rmdir()
        self.path = mountpoint

    def start_or_die(self, timeout: float = 30) -> None:
        """Start; a daemon killed before its mount exists is fine for startup points."""
        try:
            self.start(timeout)
        except AssertionError:
            if self.process is None or self.process.poll() != -signal.SIGKILL:
                raise


def errno_of(call: Callable[..., Any], *args: Any) -> int:
    try:
        call(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


def toml(settings: dict[str, Any]) -> str:
    top = {k: v for k, v in settings.items() if not isinstance(v, dict)}
    text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in top.items())
    for table, values in settings.items():
        if isinstance(values, dict):
            text += f"[{table}]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                             for k, v in values.items())
    return text


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_through(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        data = f.read()
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # next read: the daemon
    return data


class Harness:
    """One store, one cache dir, one mountpoint: crash the daemon, remount, check."""

    def __init__(self, store: StoreHandle, root: Path, settings: dict[str, Any]) -> None:
        self.store = store
        self.root = root
        self.mnt = root / "mnt"
        self.mnt.mkdir()
        self.cache = root / "cache"
        self.settings = {**BASE_SETTINGS, **settings}
        self.config = root / "crash.toml"
        self.config.write_text(toml(self.settings))
        self.cap = parse_size(self.settings.get("cache_size", "10G"))
        self.sources: dict[str, bytes] = {}  # published images the test knows the bytes of
        self.uploads: list[Upload] = []
        self.removed: set[str] = set()  # images a gesture may have deleted
        self.seeded: set[str] = set()  # the random test's images that are never deleted
        self.open_fds: list[int] = []  # inbox files a test left open when the daemon died
        self.crashing: list[CrashingMount] = []
        self.log = self.cache / "imagefs.log"  # where CLI-mounted daemons log
        self.log_start = 0  # where the current daemon's part of it starts
        self.rebuilt_cache = False
        self.notes: list[str] = []  # leftovers worth a look, not failures

    # -- images and files ------------------------------------------------------------

    def seed(self, name: str, size: int, seed: int) -> str:
        """An image made from outside: in-process on file:// (quicker), by the CLI on S3."""
        source = make_file(self.root / f"{name}.src", size, seed)
        if self.store.kind == "file":
            catalog = CatalogStore(FileStore(str(self.store.object_path(""))))
            with open(source, "rb") as f:
                image_id = upload_image(catalog, f, ImageRecord.new(
                    owner=PROJECT, name=name, status="saving"), 256 << 10).record.id
        else:
            image_id = self.store.create(source, PROJECT, "--name", name)
        self.sources[image_id] = source.read_bytes()
        return image_id

    def write(self, name: str, data: bytes, *, piece: int = MiB, reverse: bool = False,
              close: bool = True, pause: float = 0.0,
              xattrs: dict[str, str] | None = None) -> Upload:
        """Write a file into the inbox (in order, or last piece first: no streaming)."""
        upload = Upload(name, data)
        self.uploads.append(upload)
        path = self.mnt / "inbox" / PROJECT / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            upload.entry_id = os.getxattr(path, "user.imagefs.id").decode()
            for key, value in (xattrs or {}).items():
                os.setxattr(path, key, value.encode())
            offsets = list(range(0, len(data), piece))
            for offset in reversed(offsets) if reverse else offsets:
                os.pwrite(fd, data[offset:offset + piece], offset)
                if pause:
                    time.sleep(pause)
        finally:
            if close:
                os.close(fd)
                upload.closed = True
            else:
                self.open_fds.append(fd)
        return upload

    def manifest(self, image_id: str) -> mf.Manifest | None:
        key = mf.manifest_key(image_id)
        if not self.store.has_object(key):
            return None
        return mf.Manifest.decode(self.store.read_object(key))

    # -- crashing ----------------------------------------------------------------------

    def start_crashing(self, label: str, trap: Trap | None = None) -> CrashingMount:
        """A daemon (with `trap` armed) on the mountpoint and cache dir of every remount."""
        if trap is not None:
            self.label, self.trap = label, trap  # for a scenario that crashes twice
        daemon = CrashingMount(self.store, self.root, self.mnt, self.cache, self.config,
                               prelude(label, trap, self.store.kind) if trap else "")
        self.crashing.append(daemon)
        daemon.start_or_die()
        return daemon

    def until_killed(self, action: Callable[[], Any] | None = None, timeout: float = 40) -> None:
        """Run `action` (which may fail once the daemon is gone) until the crashing daemon
        reaches its crash point."""
        daemon = self.crashing[-1]
        failures: list[BaseException] = []

        def run() -> None:
            try:
                if action is not None:
                    action()
            except OSError as exc:  # the daemon died under it: ENOTCONN, ECONNABORTED...
                if daemon.process is not None and daemon.process.poll() is None and \
                        exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                    failures.append(exc)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        assert daemon.process is not None
        try:
            daemon.process.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.join(5)
            raise AssertionError(f"the crash point was never reached in {timeout}s"
                                 f"{failures and f' ({failures[0]!r})' or ''}:\n"
                                 f"{daemon.log()[-3000:]}") from None
        worker.join(30)
        assert daemon.process.returncode == -signal.SIGKILL, daemon.log()[-3000:]
        assert "CRASH POINT" in daemon.log(), daemon.log()[-3000:]
        daemon.process = None  # dead; its stale mount is left for the next mount to clean
        self.close_left_open()
        if failures:  # an errno from a live daemon, wrong bytes...
            raise failures[0]

    def close_left_open(self) -> None:
        for fd in self.open_fds:
            try:
                os.close(fd)
            except OSError:
                pass  # ENOTCONN: its daemon is gone
        self.open_fds.clear()

    def kill_cli_daemon(self) -> None:
        pid = self.daemon_pid()
        assert pid is not None, "no daemon holds the cache dir"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:  # gone, or a zombie waiting for init to reap it
            try:
                if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                    return
            except (FileNotFoundError, ProcessLookupError):
                return
            assert time.monotonic() < deadline, f"daemon {pid} survived SIGKILL"
            time.sleep(0.01)

    def wait_stale(self) -> None:
        """Until stat says ENOTCONN: the kernel answers from its attribute cache for up to
        entry_timeout after the daemon died (see test_a_mount_right_after_a_kill...)."""
        deadline = time.monotonic() + 10
        while errno_of(os.stat, self.mnt) != errno.ENOTCONN:
            assert time.monotonic() < deadline, "the killed daemon's mount is not stale"
            time.sleep(0.02)

    def daemon_pid(self) -> int | None:
        try:
            fields = (self.cache / "imagefs.lock").read_text().split()
            return int(fields[2])
        except (OSError, IndexError, ValueError):
            return None

    # -- remounting --------------------------------------------------------------------

    def mount_cli(self) -> subprocess.CompletedProcess[str]:
        self.log_start = self.log.stat().st_size if self.log.exists() else 0
        result = run_cli("mount", "--store", self.store.url, "--cache-dir", str(self.cache),
                         "--config", str(self.config), str(self.mnt), env=self.store.env,
                         timeout=90)
        assert is_mounted(self.mnt) and os.path.isdir(self.mnt / "by-id")
        return result

    def remount(self, stale: bool = True) -> None:
        """`imagefs mount` on the same mountpoint and cache dir, as a user would."""
        if stale:
            assert is_mounted(self.mnt), "the dead daemon left no mount behind"
            self.wait_stale()
        result = self.mount_cli()
        if stale:
            assert "cleaned up the stale mount" in result.stderr, result.stderr

    def daemon_log(self) -> str:
        """What the CLI-mounted daemon logged since the last mount."""
        with open(self.log, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    def umount(self) -> None:
        run_cli("umount", str(self.mnt))
        log = self.daemon_log()
        assert "Traceback" not in log, log
        lock = self.cache / "imagefs.lock"
        deadline = time.monotonic() + 30
        while True:  # the daemon has let go of the cache dir once its lock is free
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the daemon never exited after umount"
            finally:
                os.close(fd)
            time.sleep(0.05)

    def cleanup(self) -> None:
        self.close_left_open()
        for daemon in self.crashing:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait(10)
        if is_mounted(self.mnt):
            run_cli("umount", str(self.mnt), check=False)
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True,
                           check=False)
        pid = self.daemon_pid()
        if pid is not None:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"imagefs" in cmdline and str(self.cache).encode() in cmdline:
                    os.kill(pid, signal.SIGKILL)  # one of ours that outlived its umount
            except OSError:
                pass

    # -- checking ----------------------------------------------------------------------

    def settle(self, timeout: float = 60) -> None:
        """Wait until the inbox holds only what is never committed: reports, temporary
        names and empty files (a daemon killed between creating a file and opening it
        leaves one)."""
        folder = self.mnt / "inbox" / PROJECT

        def waiting(name: str) -> bool:
            try:
                return not never_committed(name) and os.stat(folder / name).st_size > 0
            except FileNotFoundError:  # published meanwhile
                return False

        deadline = time.monotonic() + timeout
        while True:
            busy = [n for n in (os.listdir(folder) if folder.exists() else []) if waiting(n)]
            if not busy:
                return
            if time.monotonic() > deadline:
                states = {n: os.getxattr(folder / n, "user.imagefs.status") for n in busy}
                raise AssertionError(f"inbox never settled: {states}\n{self.daemon_log()}")
            time.sleep(0.1)

    @property
    def missing(self) -> type[BaseException]:
        """What reading a missing object raises: boto3's NoSuchKey on S3."""
        if self.store.kind == "file":
            return FileNotFoundError
        assert self.store.server is not None
        return self.store.server.client().exceptions.NoSuchKey

    def store_keys(self) -> set[str]:
        if self.store.kind == "file":
            root = self.store.object_path("")
            return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        assert self.store.server is not None
        client = self.store.server.client()
        keys: set[str] = set()
        for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=self.store.bucket, Prefix="imagefs/"):
            keys |= {o["Key"].removeprefix("imagefs/") for o in page.get("Contents", [])}
        return keys

    def image_cli(self, *commands: list[str]) -> list[tuple[int, str]]:
        """(exit code, stdout or stderr) of `imagefs image CMD --json` for each command.

        On S3, subprocesses in parallel; on file:// the CLI's main() in this process, the
        same code without a Python start-up per image.
        """
        argvs = [["image", *c, "--json", "--store", self.store.url] for c in commands]
        if self.store.kind == "s3":
            with ThreadPoolExecutor(8) as pool:
                done = pool.map(lambda a: run_cli(*a, check=False, env=self.store.env), argvs)
                return [(r.returncode, r.stdout if r.returncode == 0 else r.stderr)
                        for r in done]
        results = []
        for argv in argvs:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli_main(argv)
            results.append((code, out.getvalue() if code == 0 else err.getvalue()))
        return results

    def check_store(self) -> dict[str, mf.Manifest]:
        """Every manifest is whole: its data and blocks are there and match it."""
        keys = self.store_keys()
        manifests: dict[str, mf.Manifest] = {}
        for key in sorted(keys):
            image_id = mf.image_id_of(key)
            if image_id is None:
                continue
            try:
                manifest = mf.Manifest.decode(self.store.read_object(key), key)
            except (FileNotFoundError, self.missing):  # purged since the listing
                assert image_id in self.removed, f"{key} vanished"
                continue
            record = manifest.record
            assert record.id == image_id
            assert record.status in ("active", "pending_delete"), (image_id, record.status)
            try:
                data = self.store.read_object(mf.data_key(image_id))
                table = self.store.read_object(mf.blocks_key(image_id))
            except (FileNotFoundError, self.missing):
                if record.status == "pending_delete" and self.manifest(image_id) is None:
                    continue  # the scrubber purged it while we looked
                raise AssertionError(f"{key} without its data or block table") from None
            assert len(data) == record.size, f"image {image_id}: half its data"
            assert hashlib.md5(data).hexdigest() == record.checksum
            assert hashlib.sha512(data).hexdigest() == record.os_hash_value
            assert sha256(table) == manifest.blocks_sha256
            assert len(table) == manifest.block_count * mf.DIGEST_SIZE
            for block in range(manifest.block_count):
                piece = data[block * manifest.block_size:(block + 1) * manifest.block_size]
                assert hashlib.sha256(piece).digest() == \
                    table[block * mf.DIGEST_SIZE:(block + 1) * mf.DIGEST_SIZE]
            manifests[image_id] = manifest
        listing, *shown = self.image_cli(["list"], *(["show", i] for i in manifests))
        assert listing[0] == 0, listing
        listed = {r["id"]: r for r in json.loads(listing[1])}
        for image_id in set(listed) ^ set(manifests):  # only purges may race the listing
            assert image_id in self.removed, f"image list and the store disagree on {image_id}"
        for image_id in set(listed) & set(manifests):
            record = manifests[image_id].record
            assert (listed[image_id]["status"], listed[image_id]["size"],
                    listed[image_id]["checksum"]) == (record.status, record.size,
                                                      record.checksum)
        for image_id, (code, out) in zip(list(manifests), shown, strict=True):
            if code and image_id in self.removed and self.manifest(image_id) is None:
                manifests.pop(image_id)  # purged meanwhile
                continue
            assert code == 0, (image_id, out)
            assert json.loads(out)["id"] == image_id
        owned = {mf.data_key(i) for i in manifests} | {mf.blocks_key(i) for i in manifests}
        orphans = sorted(k for k in keys if k.startswith(("data/", "blocks/")) and k not in owned)
        if orphans:
            self.notes.append(f"objects without a manifest: {orphans}")
        return manifests

    def check_mount(self, manifests: dict[str, mf.Manifest]) -> None:
        """Every active image reads back right; nothing published before is missing."""
        for image_id, manifest in manifests.items():
            path = self.mnt / "by-id" / image_id
            if manifest.record.status != "active":
                assert errno_of(os.stat, path) == errno.ENOENT, image_id
                continue
            if image_id in self.removed and errno_of(os.stat, path) == errno.ENOENT:
                continue  # rm'ed by the test after the listing
            data = read_through(path)
            assert sha256(data) == sha256(self.store.read_object(mf.data_key(image_id)))
            if image_id in self.sources:
                assert data == self.sources[image_id], f"image {image_id} reads back wrong"
        for image_id in self.sources:
            if image_id not in self.removed:
                assert image_id in manifests and \
                    manifests[image_id].record.status == "active", \
                    f"image {image_id}, published before the kill, is gone"

    def check_inbox(self, manifests: dict[str, mf.Manifest]) -> None:
        """Closed files are published whole or reported; no upload is half-published."""
        folder = self.mnt / "inbox" / PROJECT
        present = set(os.listdir(folder)) if folder.exists() else set()
        for upload in self.uploads:
            manifest = manifests.get(upload.entry_id)
            if upload.entry_id in self.removed:  # published, then rm'ed by the test
                continue
            if manifest is not None:
                assert self.store.read_object(mf.data_key(upload.entry_id)) == upload.data, \
                    f"{upload.name} was published with other bytes"
                self.sources.setdefault(upload.entry_id, upload.data)
            elif upload.removing:
                if upload.name in present:
                    assert (folder / upload.name).read_bytes() == upload.data
            elif upload.closed and upload.name + ".error" not in present and \
                    upload.renaming_to + ".error" not in present:
                assert upload.name in present and never_committed(upload.name), \
                    f"{upload.name} (closed before the kill) was neither published nor " \
                    f"reported; inbox: {sorted(present)}\n{self.daemon_log()[-3000:]}"
                assert (folder / upload.name).read_bytes() == upload.data
        for name in present:
            if name.endswith(".error"):
                assert (folder / name).read_text().startswith(name.removesuffix(".error"))

    def check_cache(self) -> None:
        """LMDB (after umount): the cache's own audit finds nothing; catalog rows decode."""
        if self.rebuilt_cache:
            return
        env = open_environment(self.cache, self.cap)
        try:
            assert ChunkCache(env, self.cap).audit() == []
            catalog = env.open_db(b"catalog")
            with env.begin() as txn:
                rows = [bytes(v) for v in txn.cursor(db=catalog).iternext(keys=False)]
        finally:
            env.close()
        for row in rows:  # the catalog index: [etag, manifest]
            mf.Manifest.decode(msgpack.unpackb(row)[1])

    def check_all(self) -> dict[str, mf.Manifest]:
        """After a remount: settle, then the store, the mount and the inbox."""
        log = self.daemon_log()
        if "is damaged" in log and "cache at" in log:  # allowed, with this warning
            self.rebuilt_cache = True
            self.notes.append("the LMDB cache was rebuilt")
        self.settle()
        manifests = self.check_store()
        self.check_mount(manifests)
        self.check_inbox(manifests)
        log = self.daemon_log()
        assert "Traceback" not in log, log
        return manifests


@pytest.fixture
def harness(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(store: StoreHandle, **settings: Any) -> Harness:
        made.append(Harness(store, tmp_path, settings))
        return made[-1]

    yield make
    for h in made:
        h.cleanup()
        for note in h.notes:
            print(f"{request.node.name}: {note}")


def store_of(kind: str, request: pytest.FixtureRequest) -> StoreHandle:
    return request.getfixturevalue("file_store" if kind == "file" else "s3_store")


# -- crash points ----------------------------------------------------------------------------
#
# A scenario is a generator: before its first yield it prepares the store (the daemon
# with the trap is not running yet); then it makes that daemon reach its crash point
# (h.until_killed); after its second yield (the remount and every common check are
# done) it checks what the point's own outcome must be.

@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    trap: Trap
    scenario: Callable[..., Iterator[None]]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    stores: tuple[str, ...] = ("file", "s3")
    quick_s3: bool = False  # also on S3 in the quick size
    mounted: bool = True  # False: the daemon dies before its mount exists


def two_images(h: Harness) -> tuple[str, str]:
    return h.seed("alpha", 3 * MiB, 1), h.seed("beta", 3 * MiB + 1234, 2)


def read_all(h: Harness) -> None:
    for image_id in list(h.sources):
        assert read_through(h.mnt / "by-id" / image_id) == h.sources[image_id]


def reading(h: Harness) -> Iterator[None]:
    """Read every image, front to back (sequential: prefetch runs too)."""
    two_images(h)
    yield
    h.until_killed(lambda: read_all(h))
    yield


def rereading(h: Harness) -> Iterator[None]:
    """Read, then read again: the second pass hits LMDB, and the LRU order is rewritten."""
    two_images(h)
    yield

    def again() -> None:
        read_all(h)
        while True:
            time.sleep(0.3)
            read_all(h)

    h.until_killed(again)
    yield


def uploading(size: int = 3 * MiB, expect: str = "",
              **write: Any) -> Callable[..., Iterator[None]]:
    """Write one file into the inbox; after the remount it is published or reported.

    `expect` the outcome: by default published if the writer's close() returned before
    the kill, else reported; "either" where a crash may honestly go both ways.
    """

    def scenario(h: Harness) -> Iterator[None]:
        two_images(h)
        yield
        data = make_file(h.root / "u.src", size, 7).read_bytes()
        h.until_killed(lambda: h.write("upload.raw", data, **write))
        yield
        upload = h.uploads[0]
        manifest = h.manifest(upload.entry_id)
        outcome = "published" if manifest is not None else "reported"
        if manifest is not None:
            assert read_through(h.mnt / "by-id" / upload.entry_id) == data
            assert os.path.exists(h.mnt / "projects" / PROJECT / "private" / "upload.raw")
        else:
            assert (h.mnt / "inbox" / PROJECT / "upload.raw.error").exists()
        expected = expect or ("published" if upload.closed else "reported")
        h.notes.append(f"upload {'closed' if upload.closed else 'open'} at the kill: {outcome}")
        assert expected in ("either", outcome), f"expected {expected}, got {outcome}"

    return scenario


def rejected(h: Harness) -> Iterator[None]:
    """A file the inspector refuses (raw data declared qcow2) must end as a report."""
    two_images(h)
    yield
    data = make_file(h.root / "bad.src", MiB, 8).read_bytes()
    h.until_killed(lambda: h.write(
        "bad.qcow2", data, xattrs={"user.glance.disk_format": "qcow2"}))
    yield
    assert h.manifest(h.uploads[0].entry_id) is None
    inbox = os.listdir(h.mnt / "inbox" / PROJECT)
    assert "bad.qcow2.error" in inbox or "bad.qcow2" in inbox, \
        f"the refused upload vanished without a report: inbox {inbox}"


def torn_twice(h: Harness) -> Iterator[None]:
    """A file open when the daemon died is torn; the next daemon dies writing its report."""
    two_images(h)
    first = h.start_crashing("no trap: killed by the test")
    upload = h.write("torn.raw", make_file(h.root / "t.src", MiB, 9).read_bytes(),
                     close=False)
    first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    first.process.wait(10)  # type: ignore[union-attr]
    first.process = None
    h.close_left_open()
    h.wait_stale()
    yield  # the crashing daemon comes up on the stale mount and reports the torn file
    h.until_killed()
    yield
    inbox = os.listdir(h.mnt / "inbox" / PROJECT)
    assert h.manifest(upload.entry_id) is None
    assert "torn.raw.error" in inbox or "torn.raw" in inbox, \
        f"the torn upload vanished without a report: inbox {inbox}"


def renaming_inbox(applied: bool) -> Callable[..., Iterator[None]]:
    """rsync's way: write x.part, close, mv x.part x.raw."""

    def scenario(h: Harness) -> Iterator[None]:
        two_images(h)
        yield
        data = make_file(h.root / "r.src", 2 * MiB, 10).read_bytes()
        folder = h.mnt / "inbox" / PROJECT

        def act() -> None:
            upload = h.write("synced.raw.part", data)
            time.sleep(0.3)  # the close is saved (release is asynchronous to close(2))
            os.rename(folder / "synced.raw.part", folder / "synced.raw")
            upload.name = "synced.raw"

        h.until_killed(act)
        yield
        upload = h.uploads[0]
        if applied:
            assert h.manifest(upload.entry_id) is not None
            assert read_through(h.mnt / "projects" / PROJECT / "private" / "synced.raw") == data
        else:  # still its temporary name: waiting in the inbox, whole
            assert h.manifest(upload.entry_id) is None
            assert (folder / "synced.raw.part").read_bytes() == data
            upload.name = "synced.raw.part"

    return scenario


def renaming_over(h: Harness) -> Iterator[None]:
    """mv x.part x over a file x waiting in the inbox: after a crash, x is the old file or
    the new one (rename(2) is atomic), never neither."""
    two_images(h)
    yield
    folder = h.mnt / "inbox" / PROJECT
    old = make_file(h.root / "old.src", MiB, 12).read_bytes()
    new = make_file(h.root / "new.src", MiB, 13).read_bytes()

    def act() -> None:
        h.write("synced.raw", old)
        h.write("synced.raw.part", new)
        time.sleep(0.3)  # both closes are saved
        h.uploads[1].renaming_to = "synced.raw"
        os.rename(folder / "synced.raw.part", folder / "synced.raw")

    h.until_killed(act)
    h.uploads[0].removing = True  # being replaced: checked here, not by check_inbox
    yield
    published = {u.data for u in h.uploads if h.manifest(u.entry_id) is not None}
    inbox = os.listdir(folder)
    there = {(folder / n).read_bytes() for n in inbox if n == "synced.raw"}
    assert published | there, f"neither the old nor the new synced.raw survived: {inbox}"


def resuming_twice(h: Harness) -> Iterator[None]:
    """Killed at the point, then killed again at the same point while resuming the upload."""
    two_images(h)
    yield
    data = make_file(h.root / "u.src", 3 * MiB, 7).read_bytes()
    h.until_killed(lambda: h.write("upload.raw", data))
    h.wait_stale()
    h.start_crashing(h.label, h.trap)
    h.until_killed()
    yield
    assert read_through(h.mnt / "by-id" / h.uploads[0].entry_id) == data


def removing_inbox(h: Harness) -> Iterator[None]:
    """rm of an inbox file: gone, or still there whole; never published."""
    two_images(h)
    yield
    data = make_file(h.root / "d.src", MiB, 11).read_bytes()
    folder = h.mnt / "inbox" / PROJECT

    def act() -> None:
        h.write("scratch.raw.part", data).removing = True
        os.unlink(folder / "scratch.raw.part")

    h.until_killed(act)
    yield
    assert h.manifest(h.uploads[0].entry_id) is None


def gesture(do: Callable[[Harness, str], None], check: Callable[[Harness, str, bool], None],
            applied: bool | None) -> Callable[..., Iterator[None]]:
    """A gesture on image alpha; afterwards it is applied (True), not (False) or either."""

    def scenario(h: Harness) -> Iterator[None]:
        alpha, _beta = two_images(h)
        if do is rm_alpha:
            h.removed.add(alpha)
        before = h.manifest(alpha)
        yield
        h.until_killed(lambda: do(h, alpha))
        yield
        after = h.manifest(alpha)
        changed = after is None or after.encode() != before.encode()  # type: ignore[union-attr]
        if applied is not None:
            assert changed == applied, f"gesture applied: {changed}, expected {applied}"
        check(h, alpha, changed)

    return scenario


def set_color(h: Harness, image_id: str) -> None:
    os.setxattr(h.mnt / "by-id" / image_id, "user.glance.color", b"blue")


def color_is(h: Harness, image_id: str, applied: bool) -> None:
    path = h.mnt / "by-id" / image_id
    if applied:
        assert os.getxattr(path, "user.glance.color") == b"blue"
    else:
        assert errno_of(os.getxattr, path, "user.glance.color") == errno.ENODATA


def rename_alpha(h: Harness, image_id: str) -> None:
    folder = h.mnt / "projects" / PROJECT / "private"
    os.rename(folder / "alpha.raw", folder / "gamma.raw")


def renamed(h: Harness, image_id: str, applied: bool) -> None:
    names = os.listdir(h.mnt / "projects" / PROJECT / "private")
    assert ("gamma.raw" if applied else "alpha.raw") in names, names


def publish_alpha(h: Harness, image_id: str) -> None:
    os.rename(h.mnt / "projects" / PROJECT / "private" / "alpha.raw",
              h.mnt / "projects" / PROJECT / "public" / "alpha.raw")


def public(h: Harness, image_id: str, applied: bool) -> None:
    assert ("alpha.raw" in os.listdir(h.mnt / "projects" / PROJECT / "public")) == applied
    assert json.loads(h.store.cli("image", "show", image_id, "--json").stdout)[
        "visibility"] == ("public" if applied else "private")


def rm_alpha(h: Harness, image_id: str) -> None:
    os.unlink(h.mnt / "projects" / PROJECT / "private" / "alpha.raw")


def deleted(h: Harness, image_id: str, applied: bool) -> None:
    gone = errno_of(os.stat, h.mnt / "by-id" / image_id) == errno.ENOENT
    assert gone == applied
    manifest = h.manifest(image_id)
    assert (manifest is None or manifest.record.status == "pending_delete") == applied


def refreshing(change: Callable[[Harness, str], str],
               check: Callable[[Harness, str], None]) -> Callable[..., Iterator[None]]:
    """A change made elsewhere (the CLI) while mounted; the refresh picks it up."""

    def scenario(h: Harness) -> Iterator[None]:
        _alpha, beta = two_images(h)
        yield
        subject: list[str] = []
        h.until_killed(lambda: subject.append(change(h, beta)))
        yield
        check(h, subject[0])

    return scenario


def create_gamma(h: Harness, _beta: str) -> str:
    return h.seed("gamma", 2 * MiB, 3)


def gamma_visible(h: Harness, image_id: str) -> None:
    assert read_through(h.mnt / "by-id" / image_id) == h.sources[image_id]


def delete_beta(h: Harness, beta: str) -> str:
    h.removed.add(beta)
    h.store.cli("image", "delete", beta, "--now")
    return beta


def beta_gone(h: Harness, image_id: str) -> None:
    assert h.manifest(image_id) is None
    assert errno_of(os.stat, h.mnt / "by-id" / image_id) == errno.ENOENT
    assert "beta.raw" not in os.listdir(h.mnt / "projects" / PROJECT / "private")


def rename_beta(h: Harness, beta: str) -> str:
    h.store.cli("image", "set", beta, "--name", "delta")
    return beta


def beta_renamed(h: Harness, image_id: str) -> None:
    assert "delta.raw" in os.listdir(h.mnt / "projects" / PROJECT / "private")


def scrubbing(h: Harness) -> Iterator[None]:
    """The scrubber purges an image deleted before the mount; it dies halfway."""
    alpha, _beta = two_images(h)
    h.removed.add(alpha)
    grace = h.root / "grace.toml"
    grace.write_text(toml({"delete_grace": 0.5}))
    h.store.cli("image", "delete", alpha, "--config", str(grace))
    yield
    h.until_killed()
    yield
    assert errno_of(os.stat, h.mnt / "by-id" / alpha) == errno.ENOENT
    deadline = time.monotonic() + 20  # the remounted scrubber finishes the purge
    while h.manifest(alpha) is not None:
        assert time.monotonic() < deadline, "the purge was never finished"
        time.sleep(0.2)


def starting(h: Harness) -> Iterator[None]:
    """The daemon dies while it builds its catalog index, before the mount exists."""
    two_images(h)
    yield
    h.until_killed()
    yield


SMALL_CACHE = {"cache_size": "3M", "memory_cache": "512K"}
INBOX = "imagefs.inbox"
C = "imagefs.cache:ChunkCache"

POINTS = [
    # -- reads ----------------------------------------------------------------------------
    Point("read: chunk fetched and verified, before it is cached",
          Trap(f"{C}.put", nth=2), reading),
    Point("read: inside the LMDB write transaction of a chunk",
          Trap(f"{C}._next_seq", nth=3, within=f"{C}._put"), reading),
    Point("read: chunk written to LMDB, before the env is synced",
          Trap(f"{C}.put", "after", nth=4), reading),
    Point("read: block table fetched, before it is cached",
          Trap("imagefs.catalog_index:CatalogIndex.put_block_table"), reading),
    Point("read: a prefetching ranged GET has its bytes, before they are verified",
          Trap("{store}.get_range", "after", nth=3), reading),
    Point("read: inside the LRU rewrite of chunks read again (flush_touches)",
          Trap(f"{C}._next_seq", nth=2, within=f"{C}.flush_touches"), rereading,
          settings={"memory_cache": "512K", "cache_reuse_gap": 0.5}),
    # -- eviction -------------------------------------------------------------------------
    Point("evict: over the cap, inside the put transaction, before evicting",
          Trap(f"{C}._evict"), reading, settings=SMALL_CACHE),
    Point("evict: between two victims of one eviction",
          Trap(f"{C}._remove", "after", within=f"{C}._evict"), reading,
          settings=SMALL_CACHE),
    Point("evict: an eviction done, its transaction not yet committed",
          Trap(f"{C}._evict", "after", nth=2), reading, settings=SMALL_CACHE),
    # -- uploads --------------------------------------------------------------------------
    Point("upload: streamed half way while the writer still writes",
          Trap("{writer}.write", nth=2), uploading(24 * MiB, pause=0.02, close=False)),
    Point("upload: streamed half way after the writer closed the file",
          Trap("{writer}.write", nth=2, delay=0.5), uploading(24 * MiB)),
    Point("upload: full pass at commit, half the data uploaded",
          Trap("{writer}.write", nth=2), uploading(24 * MiB, reverse=True),
          stores=("file",)),
    Point("upload: full pass at commit, a multipart part being uploaded (S3)",
          Trap("{writer}._upload_part", nth=2), uploading(24 * MiB, reverse=True),
          settings={"s3": {"part_size": "5M"}}, stores=("s3",), quick_s3=True),
    Point("upload: data object complete, before its block table and manifest",
          Trap("{writer}.commit", "after"), uploading(3 * MiB, reverse=True)),
    Point("upload: data staged, before publish",
          Trap(f"{INBOX}.committer:publish"), uploading()),
    Point("upload: block table put, before the manifest put",
          Trap("imagefs.catalog_store:CatalogStore.create"), uploading(), quick_s3=True),
    Point("upload: manifest written to a temp file, not yet renamed into place",
          Trap("{store}._check_version", "after",
               within="imagefs.catalog_store:CatalogStore.create"),
          uploading(), stores=("file",)),
    Point("upload: manifest put, before the catalog shows it",
          Trap("imagefs.catalog_store:CatalogStore.create", "after"), uploading()),
    Point("upload: shown in the catalog, before its spool is removed",
          Trap("imagefs.spool:Spool.remove"), uploading()),
    Point("upload: spool data removed, its metadata not",
          Trap("pathlib:Path.unlink", "after", within="imagefs.spool:Spool.remove"),
          uploading()),
    Point("upload: the close's spool save, between its temp file and the rename",
          Trap("os:replace", nth=3, within="imagefs.spool:Spool.save"),
          uploading(expect="either")),
    Point("upload: killed before publish, then again before the resumed publish",
          Trap(f"{INBOX}.committer:publish"), resuming_twice),
    Point("upload: a refused file, before its report is saved",
          Trap("imagefs.spool:Spool.save", cond="args[1].kind == 'error'"), rejected),
    Point("upload: a torn file found at start, before its report is saved",
          Trap("imagefs.spool:Spool.save", cond="args[1].kind == 'error'"), torn_twice),
    # -- inbox gestures -------------------------------------------------------------------
    Point("inbox mv x.part x: before the rename is saved in the spool",
          Trap("imagefs.spool:Spool.save", cond="args[1].name == 'synced.raw'"),
          renaming_inbox(applied=False)),
    Point("inbox mv x.part x: saved in the spool, before the entry is refiled",
          Trap("imagefs.spool:Spool.save", "after", cond="args[1].name == 'synced.raw'"),
          renaming_inbox(applied=True)),
    Point("inbox mv x.part x over an existing x: before the rename is saved",
          # saves named synced.raw: the old file's create, open and close, then the rename
          Trap("imagefs.spool:Spool.save", nth=4, cond="args[1].name == 'synced.raw'"),
          renaming_over, settings={"settle_time": 2.0}),
    Point("inbox mv x.part x over an existing x: saved, before the old x is removed",
          Trap("imagefs.spool:Spool.remove", cond="args[1].name == 'synced.raw'"),
          renaming_over, settings={"settle_time": 2.0}),
    Point("inbox rm: spool data removed, its metadata not",
          Trap("pathlib:Path.unlink", "after", within="imagefs.spool:Spool.remove"),
          removing_inbox),
    # -- gestures on images ---------------------------------------------------------------
    Point("setfattr: manifest loaded, before it is saved",
          Trap("imagefs.catalog_store:CatalogStore.save"), gesture(set_color, color_is, False)),
    Point("setfattr: new manifest in a temp file, not yet renamed into place",
          Trap("{store}._check_version", "after", within="imagefs.catalog_store:CatalogStore.save"),
          gesture(set_color, color_is, False), stores=("file",)),
    Point("setfattr: manifest saved, before the catalog applies it",
          Trap("imagefs.catalog_store:CatalogStore.save", "after"),
          gesture(set_color, color_is, True), quick_s3=True),
    Point("setfattr: manifest saved, before its change log entry",
          Trap("imagefs.change_log:ChangeLog.append",
               within="imagefs.catalog_store:CatalogStore.save"),
          gesture(set_color, color_is, True)),
    Point("mv (rename): saved, before the catalog applies it",
          Trap("imagefs.catalog:Catalog.apply"), gesture(rename_alpha, renamed, True)),
    Point("mv (visibility): inside the catalog index update",
          Trap("imagefs.catalog_index:CatalogIndex.update",
               within="imagefs.catalog:Catalog.apply"), gesture(publish_alpha, public, True)),
    Point("rm: pending_delete saved, before the catalog applies it",
          Trap("imagefs.catalog_store:CatalogStore.save", "after"),
          gesture(rm_alpha, deleted, True)),
    Point("rm with no grace: manifest removed, its block table and data not",
          Trap("{store}.delete", "after", within="imagefs.catalog_store:CatalogStore.delete"),
          gesture(rm_alpha, deleted, True), settings={"delete_grace": 0}),
    # -- refresh and scrub ----------------------------------------------------------------
    Point("refresh: a new image fetched, before it is applied",
          Trap("imagefs.catalog:Catalog.apply_changes", nth=2, cond="args[1].fetched"),
          refreshing(create_gamma, gamma_visible), settings={"refresh_interval": 0.3},
          quick_s3=True),
    Point("refresh: an image deleted elsewhere, inside the index update",
          Trap("imagefs.catalog_index:CatalogIndex.update", cond="list(args[2])",
               within="imagefs.catalog:Catalog.apply_changes"),
          refreshing(delete_beta, beta_gone), settings={"refresh_interval": 0.3}),
    Point("refresh: a changed manifest fetched, before it is applied",
          Trap("imagefs.catalog_store:CatalogStore.load_versions", "after",
               cond="list(args[1])", within="imagefs.catalog:Catalog._from_entries"),
          refreshing(rename_beta, beta_renamed), settings={"refresh_interval": 0.3}),
    Point("scrub: manifest purged, its data not",
          Trap("{store}.delete", "after", within="imagefs.catalog_store:CatalogStore.delete"),
          scrubbing, settings={"refresh_interval": 0.3, "delete_grace": 0.5}),
    # -- startup --------------------------------------------------------------------------
    Point("startup: inside the first catalog index write",
          Trap("imagefs.catalog_index:CatalogIndex.update"), starting, mounted=False),
]

CASES = [pytest.param(point, kind, id=f"{kind}-{point.name}")
         for kind in ("file", "s3") for point in POINTS
         if kind in point.stores and (kind == "file" or point.quick_s3 or LONG)]


@pytest.mark.parametrize("point, kind", CASES)
def test_kill_9_at_a_crash_point_then_remount(point: Point, kind: str, harness,
                                              request: pytest.FixtureRequest) -> None:
    h = harness(store_of(kind, request), **point.settings)
    steps = point.scenario(h)
    next(steps)
    h.start_crashing(point.name, point.trap)
    next(steps)
    h.remount(stale=point.mounted)
    h.check_all()
    next(steps, None)
    h.umount()
    h.check_cache()


def test_a_mount_right_after_a_kill_cleans_the_stale_mount(file_store, harness) -> None:
    """systemd restarts a dead daemon within 100 ms; the stale mount must not refuse it."""
    h = harness(file_store, entry_timeout=30)  # the kernel may trust attributes this long
    image_id = h.seed("alpha", MiB, 1)
    h.mount_cli()
    os.stat(h.mnt)  # anyone (a VM, a monitoring probe) looked at the mount recently
    h.kill_cli_daemon()
    assert is_mounted(h.mnt)
    result = run_cli("mount", "--store", h.store.url, "--cache-dir", str(h.cache),
                     "--config", str(h.config), str(h.mnt), check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "cleaned up the stale mount" in result.stderr
    assert read_through(h.mnt / "by-id" / image_id) == h.sources[image_id]


# -- random-time kills ------------------------------------------------------------------------

class Workload:
    """Readers, an uploader, gestures and an outside admin, until the daemon dies."""

    def __init__(self, h: Harness, rng: random.Random, round_: int) -> None:
        self.h = h
        self.rng = random.Random(rng.random())
        self.round = round_
        self.stop = threading.Event()
        self.wrong: list[str] = []  # wrong bytes ever returned: always a failure
        self.threads = [threading.Thread(target=self._guard, args=(fn,), daemon=True)
                        for fn in (self._read, self._read, self._upload, self._gesture,
                                   self._admin)]
        self.confirmed: dict[str, str] = {}  # image -> last `round` value a setfattr took
        self.in_flight: dict[str, str] = {}
        self.deleted: set[str] = set()  # rm returned

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _guard(self, fn: Callable[[], None]) -> None:
        while not self.stop.is_set():
            try:
                fn()
            except OSError as exc:
                if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                    return  # the daemon is gone
            except Exception as exc:  # noqa: BLE001 - CLI trouble etc.: recorded
                self.wrong.append(f"{fn.__name__}: {exc!r}")
                return

    def _active(self) -> list[str]:
        return [i for i in self.h.sources if i not in self.h.removed]

    def _read(self) -> None:
        image_id = self.rng.choice(self._active())
        path = self.h.mnt / "by-id" / image_id
        with open(path, "rb", buffering=0) as f:
            offset = self.rng.randrange(0, max(len(self.h.sources[image_id]) - 1, 1))
            f.seek(offset)
            data = f.read(self.rng.choice((4096, MiB, 8 * MiB)))
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if data != self.h.sources[image_id][offset:offset + len(data)]:
            self.wrong.append(f"image {image_id} read wrong bytes at {offset}")

    def _upload(self) -> None:
        n = len(self.h.uploads)
        data = random.Random(n).randbytes(self.rng.randrange(64 << 10, 6 * MiB))
        name = f"r{self.round}-{n}.raw"
        if self.rng.random() < 0.3:  # rsync's way
            upload = self.h.write(name + ".part", data)
            folder = self.h.mnt / "inbox" / PROJECT
            upload.renaming_to = name
            os.rename(folder / (name + ".part"), folder / name)
            upload.name, upload.renaming_to = name, ""
        else:
            self.h.write(name, data, reverse=self.rng.random() < 0.3)
        time.sleep(self.rng.uniform(0, 0.3))

    def _gesture(self) -> None:
        active = self._active()
        image_id = self.rng.choice(active)
        if self.rng.random() < 0.15 and len(active) > 3 and image_id not in self.h.seeded:
            self.h.removed.add(image_id)
            os.unlink(self.h.mnt / "by-id" / image_id)
            self.deleted.add(image_id)
        else:
            value = f"{self.round}-{self.rng.randrange(1 << 30)}"
            self.in_flight[image_id] = value
            os.setxattr(self.h.mnt / "by-id" / image_id, "user.glance.round", value.encode())
            self.confirmed[image_id] = self.in_flight.pop(image_id)
        time.sleep(self.rng.uniform(0, 0.2))

    def _admin(self) -> None:
        """Changes from another host: the refresh brings them in."""
        image_id = self.rng.choice(list(self.h.seeded))
        self.h.store.cli("image", "set", image_id, "--property", f"outside={self.round}")
        time.sleep(self.rng.uniform(0.2, 0.8))

    def check(self, manifests: dict[str, mf.Manifest]) -> None:
        assert not self.wrong, self.wrong
        for image_id in self.deleted:
            manifest = manifests.get(image_id)
            assert manifest is None or manifest.record.status == "pending_delete", image_id
        for image_id, value in self.confirmed.items():
            manifest = manifests.get(image_id)
            if manifest is None or manifest.record.status != "active":
                continue
            got = manifest.record.properties.get("round")
            assert got in (value, self.in_flight.get(image_id)), (image_id, got, value)


def random_rounds(kind: str) -> int:
    return (12 if kind == "file" else 8) if LONG else 3


@pytest.mark.parametrize("kind", ["file", "s3"] if LONG else ["file"])
def test_kill_9_at_random_moments_then_remount(kind: str, harness,
                                               request: pytest.FixtureRequest) -> None:
    seed = int(os.environ.get("IMAGEFS_CRASH_SEED", random.randrange(1 << 30)))
    print(f"IMAGEFS_CRASH_SEED={seed}")
    rng = random.Random(seed)
    h = harness(store_of(kind, request), cache_size="4M", memory_cache="1M",
                refresh_interval=0.5, delete_grace=2)
    h.seeded = {h.seed(f"seed{i}", rng.randrange(MiB, 5 * MiB), 20 + i) for i in range(3)}
    h.mount_cli()
    for round_ in range(random_rounds(kind)):
        with Workload(h, rng, round_) as work:
            time.sleep(rng.uniform(0.3, 3.0))
            h.kill_cli_daemon()
        started = time.monotonic()
        h.remount()
        manifests = h.check_all()
        work.check(manifests)
        print(f"round {round_}: {len(manifests)} images, {len(h.uploads)} uploads, "
              f"checked in {time.monotonic() - started:.1f}s")
        for image_id in list(h.removed):  # purged after its grace: nothing to read back
            if image_id not in manifests:
                h.sources.pop(image_id, None)
    h.umount()
    h.check_cache()
