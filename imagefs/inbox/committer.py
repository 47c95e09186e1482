"""The inbox's commit scheduler: settled files become images, or reports.

A file is committed once no writer has it open and it has not changed for `settle_time`
(qemu-img and rsync close and reopen or rename their targets, so "last close" is not
enough). The pipeline inspects, hashes and uploads it, the manifest is written last,
and the entry leaves the inbox. What happens on failure depends on whether trying again
can help: a refusal (unsafe or truncated image, bad metadata) or a bug becomes a
`<name>.error` at once; store trouble is retried with the package's backoff, forever,
since the spool keeps the data; local disk trouble a few times, then reported.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import trio

from imagefs import manifest as mf
from imagefs.catalog_store import CatalogStore
from imagefs.errors import (ImageNotFound, InvalidValue, NotPermitted, ObjectChanged,
                            QuotaExceeded, StoreError)
from imagefs.inbox.entries import ERROR_SUFFIX, InboxEntry, Registry, never_committed
from imagefs.inbox.files import UPLOAD_FIELDS, InboxFiles
from imagefs.inbox.streaming import StreamingStage
from imagefs.naming import image_name
from imagefs.pipeline import StagedData, publish, stage_data
from imagefs.quotas import Quotas, Usage
from imagefs.records import ImageRecord
from imagefs.retry import Backoff
from imagefs.spool import Spool, SpoolRecord

log = logging.getLogger(__name__)

UPLOAD_RETRY = Backoff(first=2.0, most=300.0)
_LOCAL_ATTEMPTS = 5  # a spool file that cannot be read this many times is reported
_STREAM_IDLE = 10.0  # a temp name not renamed this long after its last write stops streaming
_UPLOADS = 2


class Committer:
    def __init__(self, registry: Registry, files: InboxFiles, spool: Spool,
                 catalog_store: CatalogStore, block_size: int, settle_time: float,
                 on_publish: Callable[[mf.Manifest], None], quotas: Quotas,
                 stored: Callable[[str], Usage]) -> None:
        self.quotas = quotas
        self._stored = stored
        self.registry = registry
        self.files = files
        self.spool = spool
        self.catalog_store = catalog_store
        self.block_size = block_size
        self.settle_time = settle_time
        self._on_publish = on_publish
        self._uploads = trio.CapacityLimiter(_UPLOADS)
        # Since the daemon started, for `imagefs status` and metrics.
        self.published = 0  # images published
        self.published_bytes = 0
        self.failed = 0  # uploads reported as <name>.error
        self.retried = 0  # attempts that failed on store or disk trouble, to be tried again

    async def run(self) -> None:
        """Start the work each settled entry is due for, forever."""
        async with trio.open_nursery() as nursery:
            while True:
                now = time.monotonic()
                for entry in self.registry.all():
                    if not self._settled(entry, now):
                        continue
                    if entry.record.write_error:
                        entry.state = "failed"
                        nursery.start_soon(self._guarded, self._fail, entry,
                                           f"a write to it failed ({entry.record.write_error})"
                                           ", so it is incomplete")
                    elif self._committable(entry):
                        entry.state = "inspecting"
                        nursery.start_soon(self._guarded, self._commit, entry)
                    elif entry.stream is not None and \
                            now - entry.last_change >= _STREAM_IDLE:
                        nursery.start_soon(self._guarded, self._stop_stream, entry)
                await trio.sleep(max(min(self.settle_time / 4, 0.25), 0.05))

    def _settled(self, entry: InboxEntry, now: float) -> bool:
        return (not entry.is_error and entry.state == "settling" and not entry.writers
                and now - entry.last_change >= self.settle_time and now >= entry.not_before)

    @staticmethod
    def _committable(entry: InboxEntry) -> bool:
        return not never_committed(entry.record.name) and entry.size > 0

    async def _guarded(self, task: Callable[..., Any], entry: InboxEntry, *args: Any) -> None:
        """One entry's trouble never reaches the loop: log it and try again later."""
        try:
            await task(entry, *args)
        except Exception:
            entry.attempts += 1
            delay = UPLOAD_RETRY.delay(entry.attempts)
            log.exception("inbox/%s/%s: unexpected failure; trying again in %.0fs",
                          entry.record.project, entry.record.name, delay)
            if not entry.is_error:
                entry.state = "settling"
                entry.not_before = time.monotonic() + delay

    async def _stop_stream(self, entry: InboxEntry) -> None:
        await self.files.cancel_stream(entry)

    async def _commit(self, entry: InboxEntry) -> None:
        name = f"inbox/{entry.record.project}/{entry.record.name}"
        stream, entry.stream = entry.stream, None
        record = dataclasses.replace(entry.record, metadata=dict(entry.record.metadata))
        try:
            async with self._uploads:
                # Abandoned on shutdown: the spool stays, and the next start resumes it.
                manifest = await trio.to_thread.run_sync(
                    self._upload, record, entry.size, stream, entry, abandon_on_cancel=True)
        except (InvalidValue, NotPermitted, ObjectChanged, QuotaExceeded) as exc:
            log.warning("%s rejected: %s", name, exc)
            await self._fail(entry, str(exc))
            return
        except (StoreError, OSError) as exc:
            entry.attempts += 1
            local = isinstance(exc, OSError)
            if local and entry.attempts >= _LOCAL_ATTEMPTS:
                log.error("%s: its spool file cannot be read (%s); reported", name, exc)
                await self._fail(entry, f"its staged copy on this host cannot be read ({exc})")
                return
            delay = UPLOAD_RETRY.delay(entry.attempts - 1)
            self.retried += 1
            log.warning("%s: upload failed (%s); retrying in %.0fs (attempt %d)", name, exc,
                        delay, entry.attempts)
            entry.state = "settling"
            entry.not_before = time.monotonic() + delay
            return
        except Exception as exc:  # a bug: the same input would fail the same way again
            log.exception("%s: upload failed unexpectedly; reported, not retried", name)
            await self._fail(entry, f"imagefs could not process it ({exc!r}); the daemon "
                                    "log has the details")
            return
        await trio.to_thread.run_sync(self._on_publish, manifest)
        self.published += 1
        self.published_bytes += manifest.record.size or 0
        self.registry.note_published(entry.record.project, entry.record.name,
                                     manifest.record.id)
        await self.files.discard(entry)
        stale = self.registry.lookup(entry.record.project, entry.record.name + ERROR_SUFFIX)
        if stale is not None:  # an earlier attempt's report no longer applies
            await self.files.discard(stale)
        log.info("%s published as image %s (%s, %d bytes)", name, manifest.record.id,
                 manifest.record.disk_format, manifest.record.size or 0)

    def _upload(self, record: SpoolRecord, size: int, stream: StreamingStage | None,
                entry: InboxEntry) -> mf.Manifest:
        """Blocking: stage (unless the stream did) and publish. Runs in a worker thread."""
        self.catalog_store.identity.ensure_for_write()
        try:  # published by a run that died before cleaning up?
            return self.catalog_store.load(record.entry_id)
        except ImageNotFound:
            pass
        try:
            return self._stage_and_publish(record, size, stream, entry)
        except BaseException:
            if stream is not None:  # stop it, and remove what it put in the store
                stream.cancel()
            raise

    def _stage_and_publish(self, record: SpoolRecord, size: int,
                           stream: StreamingStage | None, entry: InboxEntry) -> mf.Manifest:
        # Another host may have added images since the writes were let in.
        self.quotas.check(record.project, self._stored(record.project), Usage(1, size, 0))
        staged: StagedData | None = stream.result(size) if stream is not None else None
        if staged is None:
            trio.from_thread.run_sync(setattr, entry, "state", "uploading")
            with open(self.spool.data_path(record), "rb") as source:
                staged = stage_data(self.catalog_store.store, source, record.entry_id,
                                    self.block_size)
        fields: dict[str, Any] = {"name": image_name(record.name), "container_format": "bare"}
        fields.update(record.metadata)
        image = ImageRecord(id=record.entry_id, owner=record.project, status="saving",
                            **{k: v for k, v in fields.items() if k in UPLOAD_FIELDS})
        image.properties = {k: v for k, v in fields.items() if k not in UPLOAD_FIELDS}
        return publish(self.catalog_store, image, staged)

    async def _fail(self, entry: InboxEntry, reason: str) -> None:
        """Replace the entry with `<name>.error`, explaining why and what to do.

        The report is shown and saved before the entry goes, so neither a watcher nor a
        crash ever sees neither (a crash in between leaves both, and the entry fails
        again at the next start). On a full spool disk the entry's data goes first to
        make room; a report that still cannot be saved is shown until the daemon stops.
        """
        self.failed += 1
        name = entry.record.name + ERROR_SUFFIX
        old = self.registry.lookup(entry.record.project, name)
        if old is not None:
            await self.files.discard(old)
        report = SpoolRecord(str(uuid.uuid4()), entry.record.project, name, kind="error",
                             reason=f"{entry.record.name} was not published: {reason}\n"
                                    "Fix the file and copy it into the inbox again; "
                                    "rm this .error file to clear it.\n")
        self.registry.add(InboxEntry(report, state="failed"))
        try:
            await trio.to_thread.run_sync(self.spool.save, report)
        except OSError:
            await self.files.discard(entry)  # room for the report on a full disk
            try:
                await trio.to_thread.run_sync(self.spool.save, report)
            except OSError as exc:
                log.error("inbox/%s/%s: could not save the report in the spool (%s); it is "
                          "shown until the daemon stops", report.project, name, exc)
            return
        await self.files.discard(entry)
