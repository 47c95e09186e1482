"""A store in a local (or NFS) directory: the embedded default, no services needed."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from imagefs.errors import (ObjectChanged, ObjectNotFound, StoreAccessDenied, StoreError,
                            StoreNotFound, StoreUnavailable)
from imagefs.stores.base import ObjectInfo, ObjectWriter, Store

_TMP_MARK = ".tmp-"
# Conditional writes compare and replace under this lock: an flock, so it holds between
# processes on this host and, on NFSv4 (lockd), between hosts.
_LOCK_FILE = ".imagefs-write-lock"


def _etag(st: os.stat_result) -> str:
    """Changes on every rewrite: a replace brings a new inode and a new mtime."""
    return f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate(exc: OSError, what: str) -> StoreError:
    if exc.errno == errno.ENOENT:
        return ObjectNotFound(f"{what}: no such object")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StoreAccessDenied(f"{what}: permission denied")
    return StoreUnavailable(f"{what}: {exc.strerror}")


class _FileWriter(ObjectWriter):
    """Writes to a temp file beside the target, renamed into place on commit."""

    def __init__(self, target: Path) -> None:
        self._target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = target.with_name(f"{target.name}{_TMP_MARK}{uuid.uuid4().hex}")
        self._file = open(self._tmp, "wb")
        self.etag = ""  # the committed object's, once commit() has run

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:  # a full or failing disk is worth retrying later
            raise _translate(exc, str(self._target)) from exc

    def commit(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            st = os.stat(self._tmp)
            os.replace(self._tmp, self._target)
            _fsync_dir(self._target.parent)
        except OSError as exc:
            raise _translate(exc, str(self._target)) from exc
        self.etag = _etag(st)  # a rename keeps inode, mtime and size

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        try:
            self._tmp.unlink()
        except OSError:
            pass


class FileStore(Store):
    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"refusing unsafe object key {key!r}")
        return self.root / key

    def check(self) -> None:
        if not self.root.is_dir():
            raise StoreNotFound(f"store directory {self.root} does not exist "
                                f"(create it with: mkdir -p {self.root})")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StoreAccessDenied(f"store directory {self.root} is not readable")

    def get(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        try:
            with open(self._path(key), "rb") as f:
                return f.read(), _etag(os.fstat(f.fileno()))
        except OSError as exc:
            raise _translate(exc, key) from exc

    def exists(self, key: str) -> bool:
        try:
            self._path(key).stat()
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _translate(exc, key) from exc

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except OSError as exc:
            raise _translate(exc, key) from exc
        try:
            parts = []
            got = 0
            while got < length:
                piece = os.pread(fd, length - got, start + got)
                if not piece:
                    raise StoreError(f"{key} is shorter than expected: wanted {length} bytes "
                                     f"at {start}, got {got}")
                parts.append(piece)
                got += len(piece)
            return b"".join(parts)
        except OSError as exc:
            raise _translate(exc, key) from exc
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes, *, if_match: str | None = None,
            if_absent: bool = False) -> str:
        conditional = if_match is not None or if_absent
        writer = self.open_writer(key)
        try:
            writer.write(data)
            with self._write_lock() if conditional else contextlib.nullcontext():
                if conditional:
                    self._check_version(key, if_match)
                writer.commit()
                return writer.etag
        except BaseException:
            writer.abort()
            raise

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        try:
            fd = os.open(self.root / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _translate(exc, _LOCK_FILE) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _check_version(self, key: str, if_match: str | None) -> None:
        try:
            current: str | None = _etag(self._path(key).stat())
        except FileNotFoundError:
            current = None
        if current != if_match:
            raise ObjectChanged(f"{key} was changed by someone else (expected version "
                                f"{if_match or 'none'}, found {current or 'none'})")

    def open_writer(self, key: str) -> _FileWriter:
        try:
            return _FileWriter(self._path(key))
        except OSError as exc:
            raise _translate(exc, key) from exc

    def list(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        folder = prefix.rstrip("/")
        try:
            names = sorted(os.listdir(self._path(folder)))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _translate(exc, prefix) from exc
        for name in names:
            key = f"{folder}/{name}"
            if _TMP_MARK in name or (start_after is not None and key <= start_after):
                continue
            try:
                st = os.stat(self._path(key))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield ObjectInfo(key, st.st_size, _etag(st), st.st_mtime)

    def remove_stale_temporaries(self, older_than: float) -> int:
        """Temp files of writes a crash cut short (`<key>.tmp-<random>`), if old enough."""
        cutoff = time.time() - older_than
        removed = 0
        for folder in ("data", "blocks", "manifests"):
            try:
                entries = list(os.scandir(self.root / folder))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _translate(exc, folder) from exc
            for entry in entries:
                try:
                    if _TMP_MARK in entry.name and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _translate(exc, key) from exc
