"""Bulk adoption: one image per file of a directory or an S3 prefix (`imagefs image import`).

Every file takes the path `imagefs image create` takes (pipeline.upload_image: format
detection, Glance's safety checks, hashes, the manifest written last), named by the one
name rule. Resuming needs no journal: each image carries the file it came from in its
own manifest (`imagefs_import_source`, and `imagefs_import_stamp`: size and mtime or
ETag), and the manifest is the upload's commit point. A run stopped at any moment (Ctrl-C,
kill -9, a crash) has left whole images that name their source, or nothing visible; the
next run skips every source an image of the project already names.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from imagefs.catalog_store import CatalogStore
from imagefs.config import Settings
from imagefs.errors import ImagefsError, InvalidValue, StoreError
from imagefs.naming import image_name, is_temporary
from imagefs.pipeline import READ_SIZE, upload_image
from imagefs.progress import FilesBar, files_bar
from imagefs.quotas import Quotas, Usage, stored_usage
from imagefs.records import ImageRecord
from imagefs.stores import Store, open_store

log = logging.getLogger(__name__)

SOURCE_KEY = "imagefs_import_source"
STAMP_KEY = "imagefs_import_stamp"
# What became of each file, in the order the summary shows them.
IMPORTED, WOULD_IMPORT, ALREADY, SKIPPED, REFUSED, FAILED = (
    "imported", "would import", "already imported", "skipped", "refused", "failed")
_ORDER = (IMPORTED, WOULD_IMPORT, ALREADY, SKIPPED, REFUSED, FAILED)


@dataclass(frozen=True)
class ImportOptions:
    project: str
    visibility: str = "private"
    tags: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)
    recursive: bool = False
    jobs: int = 1
    dry_run: bool = False


@dataclass(frozen=True)
class Candidate:
    """A file to import: what names it, where it is, the version of it, how to read it."""

    path: str  # relative to the source, '/'-separated: the image name comes from it
    source: str  # absolute path or s3:// URL (imagefs_import_source)
    stamp: str  # imagefs_import_stamp: changes whenever the file does
    size: int
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True)
class Outcome:
    path: str
    result: str
    reason: str = ""
    size: int = 0  # bytes imported (or that would be)


@dataclass
class Report:
    outcomes: list[Outcome]
    not_done: int = 0  # files an interruption or a store failure left for the next run
    stopped: str = ""  # why the run stopped early ("" if it did not)
    interrupted: bool = False

    def lines(self) -> list[str]:
        """The summary: one line per file or folder, then the counts."""
        width = max(len(r) for r in _ORDER)
        ordered = sorted(self.outcomes, key=lambda o: (_ORDER.index(o.result), o.path))
        lines = [f"{o.result:<{width}}  {o.path}: {o.reason}" for o in ordered]
        count = {r: sum(o.result == r for o in self.outcomes) for r in _ORDER}
        verb = "would be imported" if count[WOULD_IMPORT] else "imported"
        lines.append(f"{count[IMPORTED] + count[WOULD_IMPORT]} {verb} "
                     f"({sum(o.size for o in self.outcomes)} bytes), {count[ALREADY]} "
                     f"already imported, {count[SKIPPED]} skipped, {count[REFUSED]} refused, "
                     f"{count[FAILED]} failed")
        if self.stopped:
            lines.append(f"{self.stopped}: {self.not_done} more "
                         f"file{'' if self.not_done == 1 else 's'} not imported yet; run the "
                         "same command again to finish")
        return lines

    def exit_status(self) -> int:
        """130 if interrupted; 1 if a file was refused or failed, or the run stopped."""
        if self.interrupted:
            return 130
        return int(bool(self.stopped) or any(o.result in (REFUSED, FAILED)
                                             for o in self.outcomes))


class _SourceUnreadable(Exception):
    """The source file (not the store) failed us: reported for that file alone."""


class _Cancelled(BaseException):
    """Raised inside an upload's progress callback so the upload aborts what it wrote."""


# -- finding the files -------------------------------------------------------------------


def _destination(store: Store) -> str:
    """The catalog's own store, as sources are named: never imported into itself."""
    if store.url.startswith("file://"):
        return os.path.realpath(store.url.removeprefix("file://")) + "/"
    return store.url.rstrip("/") + "/"


def _folder_verdict(name: str, where: str, recursive: bool, destination: str) -> str | None:
    """Why a folder is not descended into, or None."""
    if is_temporary(name):
        return "a dotfile or temporary name"
    if where + "/" == destination:
        return "the store this import writes to"
    return None if recursive else "a folder (--recursive imports what is in it)"


def _file_verdict(name: str, size: int) -> str | None:
    """Why a file is never an image (the inbox's rules), or None."""
    if is_temporary(name):
        return "a dotfile or temporary name"
    return "empty" if size == 0 else None


def scan_directory(root: Path, recursive: bool,
                   destination: str) -> Iterator[Candidate | Outcome]:
    """Files of `root` (and its folders, if recursive) in name order, or why not.

    Symbolic links to files are followed, and a file reached twice is imported once,
    under its own name rather than a link's; links to folders are not followed, so a
    link loop cannot trap the walk.
    """
    found = list(_walk(root.resolve(), "", recursive, destination))
    first: dict[tuple[int, int], str] = {}
    for item in sorted((f for f in found if isinstance(f, _Found)), key=lambda f: f.is_link):
        first.setdefault(item.inode, item.candidate.path)
    for item in found:
        if not isinstance(item, _Found):
            yield item
        elif first[item.inode] == item.candidate.path:
            yield item.candidate
        else:
            yield Outcome(item.candidate.path, SKIPPED, f"the same file as {first[item.inode]}")


@dataclass(frozen=True)
class _Found:
    candidate: Candidate
    inode: tuple[int, int]
    is_link: bool


def _walk(root: Path, folder: str, recursive: bool,
          destination: str) -> Iterator[_Found | Outcome]:
    try:
        entries = sorted(os.scandir(root / folder), key=lambda e: e.name)
    except OSError as exc:
        yield Outcome(f"{folder}/", FAILED, f"unreadable folder: {exc.strerror}")
        return
    for entry in entries:
        path = f"{folder}/{entry.name}" if folder else entry.name
        try:
            st = entry.stat()  # follows symbolic links
        except FileNotFoundError:
            yield Outcome(path, SKIPPED, "a symbolic link to nothing, or gone meanwhile")
            continue
        except OSError as exc:
            yield Outcome(path, FAILED, f"unreadable: {exc.strerror}")
            continue
        if stat.S_ISDIR(st.st_mode):
            why = "a symbolic link to a folder (not followed)" if entry.is_symlink() else \
                _folder_verdict(entry.name, os.path.realpath(entry.path), recursive,
                                destination)
            if why:
                yield Outcome(f"{path}/", SKIPPED, why)
            else:
                yield from _walk(root, path, recursive, destination)
            continue
        why = "not a regular file" if not stat.S_ISREG(st.st_mode) else \
            _file_verdict(entry.name, st.st_size)
        if why:
            yield Outcome(path, SKIPPED, why)
            continue
        candidate = Candidate(path, str(root / path),
                              f"size={st.st_size} mtime_ns={st.st_mtime_ns}", st.st_size,
                              _local_opener(root / path, st))
        yield _Found(candidate, (st.st_dev, st.st_ino), entry.is_symlink())


def _local_opener(path: Path, listed: os.stat_result) -> Callable[[], IO[bytes]]:
    return lambda: io.BufferedReader(_LocalReader(path, listed), READ_SIZE)


class _LocalReader(io.RawIOBase):
    """A file that must stay as it was listed: one that changes while read is not
    imported (half a file written by a tool still running would otherwise be)."""

    def __init__(self, path: Path, listed: os.stat_result) -> None:
        try:
            self._file = open(path, "rb", buffering=0)
        except OSError as exc:
            raise _SourceUnreadable(f"unreadable: {exc.strerror}") from None
        self._listed = (listed.st_size, listed.st_mtime_ns)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            got = self._file.readinto(buffer)
            now = os.fstat(self._file.fileno()) if not got else None
        except OSError as exc:
            raise _SourceUnreadable(f"unreadable: {exc.strerror}") from None
        if now is not None and (now.st_size, now.st_mtime_ns) != self._listed:
            raise _SourceUnreadable("it changed while it was read; import it again once "
                                    "whatever writes it is done")
        return got or 0

    def close(self) -> None:
        if hasattr(self, "_file"):
            self._file.close()
        super().close()


def scan_s3(source: Store, recursive: bool, destination: str) -> Iterator[Candidate | Outcome]:
    """Objects under an S3 prefix, as scan_directory does files: keys with '/' after the
    prefix are in folders, reported once each unless recursive."""
    reported: set[str] = set()
    for info in source.list(""):
        *folders, name = info.key.split("/")
        for depth, folder in enumerate(folders):
            where = "/".join(folders[:depth + 1])
            why = _folder_verdict(folder, f"{source.url}/{where}", recursive, destination)
            if why:
                if where not in reported:
                    reported.add(where)
                    yield Outcome(f"{where}/", SKIPPED, why)
                break
        else:
            if not name:
                continue  # "folder/": the marker some tools write for a folder
            why = _file_verdict(name, info.size)
            if why:
                yield Outcome(info.key, SKIPPED, why)
                continue
            etag = info.etag.strip('"')
            yield Candidate(info.key, f"{source.url}/{info.key}",
                            f"size={info.size} etag={etag}", info.size,
                            _object_opener(source, info.key, info.size))


def _object_opener(store: Store, key: str, size: int) -> Callable[[], IO[bytes]]:
    return lambda: io.BufferedReader(_ObjectReader(store, key, size), READ_SIZE)


class _ObjectReader(io.RawIOBase):
    """An object read front to back in ranged GETs (the buffer above sets their size)."""

    def __init__(self, store: Store, key: str, size: int) -> None:
        self._store = store
        self._key = key
        self._size = size
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        length = min(len(buffer), self._size - self._offset)
        if length <= 0:
            return 0
        try:
            data = self._store.get_range(self._key, self._offset, length)
        except StoreError as exc:
            raise _SourceUnreadable(f"unreadable: {exc}") from None
        buffer[:length] = data
        self._offset += length
        return length


def scan(source: str, recursive: bool, settings: Settings,
         destination: str) -> list[Candidate | Outcome]:
    """What `source` (a folder, file:///folder or s3://bucket/prefix/) holds."""
    if source.startswith("s3://"):
        store = open_store(source, settings.s3, max(settings.read_timeout, 30.0))
        return list(scan_s3(store, recursive, destination))
    root = Path(source.removeprefix("file://"))
    if not root.is_dir():
        raise InvalidValue(f"{source}: no such folder (give a folder or s3://BUCKET/PREFIX/)")
    return list(scan_directory(root, recursive, destination))


# -- importing them ----------------------------------------------------------------------


def run_import(catalog: CatalogStore, settings: Settings, source: str,
               options: ImportOptions) -> Report:
    """Import every file of `source` the project's images do not already name."""
    # Project, tags and properties are the same for every file: refuse them once.
    ImageRecord.new(owner=options.project, visibility=options.visibility,
                    tags=list(options.tags), properties=dict(options.properties))
    found = scan(source, options.recursive, settings, _destination(catalog.store))
    manifests = catalog.load_all()
    versions: dict[tuple[str, str], ImageRecord] = {}  # (source, stamp) -> image
    newest: dict[str, ImageRecord] = {}  # source -> the image last imported from it
    for manifest in sorted(manifests, key=lambda m: m.record.created_at):
        record = manifest.record
        if record.owner == options.project and record.status != "pending_delete" \
                and SOURCE_KEY in record.properties:
            source_of = record.properties[SOURCE_KEY]
            versions[(source_of, record.properties.get(STAMP_KEY, ""))] = record
            newest[source_of] = record
    outcomes = [f for f in found if isinstance(f, Outcome)]
    todo = []
    for candidate in (f for f in found if isinstance(f, Candidate)):
        image = versions.get((candidate.source, candidate.stamp))
        if image is not None:
            outcomes.append(Outcome(candidate.path, ALREADY, f"image {image.id}"))
        elif options.dry_run:
            outcomes.append(Outcome(candidate.path, WOULD_IMPORT,
                                    f"as {image_name(candidate.path)!r}", candidate.size))
        else:
            todo.append((candidate, newest.get(candidate.source)))
    if not todo:
        return Report(outcomes)
    usage = stored_usage((m.record for m in manifests), options.project)
    return _Uploads(catalog, settings, options, usage).run(todo, outcomes)


class _Uploads:
    """Up to `jobs` uploads at a time; a store failure or Ctrl-C stops the rest."""

    def __init__(self, catalog: CatalogStore, settings: Settings, options: ImportOptions,
                 usage: Usage) -> None:
        self.catalog = catalog
        self.settings = settings
        self.options = options
        self.quotas = Quotas(settings.quotas)
        self.usage = usage
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.stopped = ""

    def run(self, todo: list[tuple[Candidate, ImageRecord | None]],
            outcomes: list[Outcome]) -> Report:
        report = Report(outcomes)
        total = sum(c.size for c, _ in todo)
        results: dict[Future[Outcome | None], Outcome | None] = {}
        with files_bar(total, len(todo), "import") as bar, \
                ThreadPoolExecutor(max(self.options.jobs, 1), "import") as pool:
            futures = [pool.submit(self._one, c, before, bar) for c, before in todo]
            try:
                for future in as_completed(futures):
                    results[future] = future.result()
            except KeyboardInterrupt:
                self._halt("interrupted")
                report.interrupted = True
                for future in futures:
                    results[future] = future.result()  # the running ones end soon
        outcomes.extend(o for o in results.values() if o is not None)
        report.not_done = sum(o is None for o in results.values())
        report.stopped = self.stopped
        return report

    def _halt(self, why: str) -> None:
        with self.lock:
            self.stopped = self.stopped or why
        self.stop.set()

    def _one(self, candidate: Candidate, before: ImageRecord | None,
             bar: FilesBar) -> Outcome | None:
        """Import one file; None if the run was stopped before it was."""
        if self.stop.is_set():
            return None
        sent = 0

        def progress(size: int) -> None:
            nonlocal sent
            sent += size
            bar.advance(size)
            if self.stop.is_set():
                raise _Cancelled

        try:
            outcome = self._upload(candidate, before, progress)
        except _Cancelled:
            return None
        finally:
            bar.advance(max(candidate.size - sent, 0))  # what a failed upload skipped
        bar.file_done()
        return outcome

    def _upload(self, candidate: Candidate, before: ImageRecord | None,
                progress: Callable[[int], None]) -> Outcome:
        options = self.options
        name = image_name(candidate.path)
        try:
            record = ImageRecord.new(
                owner=options.project, name=name, visibility=options.visibility,
                tags=list(options.tags), status="saving",
                properties={**options.properties, SOURCE_KEY: candidate.source,
                            STAMP_KEY: candidate.stamp})
            self._reserve(candidate.size)
        except InvalidValue as exc:
            return Outcome(candidate.path, REFUSED, str(exc))
        except ImagefsError as exc:  # over a quota
            return Outcome(candidate.path, FAILED, str(exc))
        try:
            with candidate.open() as source:
                image = upload_image(self.catalog, source, record, self.settings.block_size,
                                     progress).record
        except BaseException as exc:
            self._release(candidate.size)
            return self._failure(candidate, exc)
        again = f"; a new version of the file image {before.id} came from" if before else ""
        return Outcome(candidate.path, IMPORTED, f"image {image.id} {name!r}, "
                       f"{image.disk_format}, {image.size} bytes{again}", image.size or 0)

    def _failure(self, candidate: Candidate, exc: BaseException) -> Outcome:
        """What the summary says of a failed upload; re-raises what is not about it."""
        if isinstance(exc, _SourceUnreadable):
            return Outcome(candidate.path, FAILED, str(exc))
        if isinstance(exc, InvalidValue):  # UnsafeImage: the inspector's reason
            return Outcome(candidate.path, REFUSED, str(exc))
        if isinstance(exc, StoreError):  # the catalog's store: every other file would fail too
            self._halt(f"stopped: {exc}")
            return Outcome(candidate.path, FAILED, str(exc))
        if isinstance(exc, Exception):
            log.debug("importing %s failed", candidate.path, exc_info=exc)
            return Outcome(candidate.path, FAILED, f"unexpected error: {exc!r}")
        raise exc

    def _reserve(self, size: int) -> None:
        """Count the file against the project's quotas (QuotaExceeded if over)."""
        if self.quotas.limits(self.options.project):
            with self.lock:
                self.quotas.check(self.options.project, self.usage, Usage(1, size))
                self.usage += Usage(1, size)

    def _release(self, size: int) -> None:
        with self.lock:
            self.usage += Usage(-1, -size)
