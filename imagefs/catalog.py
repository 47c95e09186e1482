"""The daemon's view of the catalog: a snapshot in memory, refreshed from the store.

A refresh has two halves. `fetch_changes` talks only to the store (it may stall, so the
daemon runs it in a thread it can abandon); `apply_changes` updates memory and the LMDB
index (quick, local, never abandoned). "Absence is not evidence": a listing that lost
images removes only those the store confirms are gone, and an empty listing empties a
catalog only when the store's marker vouches for it (see store_identity.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from imagefs import manifest as mf
from imagefs.catalog_index import CatalogIndex
from imagefs.catalog_store import CatalogStore, Versioned
from imagefs.change_log import SNAPSHOT_EVERY, Entry
from imagefs.change_log import Snapshot as LogSnapshot
from imagefs.errors import ManifestDamaged, StoreUntrusted
from imagefs.records import ImageRecord
from imagefs.store_identity import MARKER_KEY

log = logging.getLogger(__name__)
_SNAPSHOT_AT_LEAST = 16  # log entries between snapshots of a small catalog


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One consistent view of the catalog; `generation` changes whenever it does."""

    generation: int
    images: dict[str, mf.Manifest]

    def record(self, image_id: str) -> ImageRecord | None:
        manifest = self.images.get(image_id)
        return manifest.record if manifest else None


@dataclasses.dataclass(frozen=True)
class Changes:
    """What one refresh learnt from the store, to be applied in one step."""

    started: int  # the local change sequence number when the refresh began
    fetched: dict[str, Versioned]
    gone: list[str]
    position: int | None  # the change log entry this brings the catalog up to
    how: str  # "log", "snapshot" or "listing": what the refresh read
    store_id: str | None = None  # the store's catalog id, when the refresh checked it


class Catalog:
    """The daemon's catalog: a snapshot swapped atomically by each change.

    A refresh reads the change log's tail (change_log.py), one small request when
    nothing changed. It lists every manifest instead on the first mount of a cache dir
    with no snapshot to start from, and every `full_interval` seconds, to catch
    changes the log missed.
    """

    def __init__(self, catalog_store: CatalogStore, index: CatalogIndex,
                 full_interval: float = 3600.0) -> None:
        self.catalog_store = catalog_store
        self.index = index
        self.full_interval = full_interval
        self._entries: dict[str, Versioned] = {}
        self._lock = threading.Lock()
        # Local changes since a refresh began must not be undone by what it read; they
        # are fetched again by the next refresh, so one made elsewhere still wins.
        self._change_seq = 0
        self._changed_at: dict[str, int] = {}
        self._recheck: set[str] = set()
        self.position: int | None = None  # change log entries applied so far
        self._full_due = 0.0  # time.monotonic() of the next full listing
        self._compacted = 0  # the newest catalog snapshot this host knows of
        self._repair = False  # log what the next full listing finds changed
        self.snapshot = Snapshot(0, {})

    def load_cached(self, crashed: bool = False) -> int:
        """Start from the LMDB index, and the log position it was saved at.

        After a crash (`crashed`) the first refresh lists every manifest: the daemon may
        have died between a manifest write and its log entry. What that listing finds
        changed is logged again, so other hosts learn it too.
        """
        with self._lock:
            self._entries = self.index.load()
            self.position = self.index.log_position if self._entries else None
            # Changes applied here but not yet read back from the store (see apply()).
            self._recheck = {i for i, (etag, _m) in self._entries.items() if not etag}
            self._publish()
        # A cache that was offline catches up from the log; the full listing can wait.
        self._full_due = 0.0 if crashed or not self.position else \
            time.monotonic() + self.full_interval
        self._repair = crashed
        return len(self._entries)

    def refresh(self) -> bool:
        """Bring the snapshot up to date with the store; True if anything changed."""
        return self.apply_changes(self.fetch_changes())

    def fetch_changes(self) -> Changes:
        """Blocking, store only: what changed since the last refresh."""
        with self._lock:
            started = self._change_seq
            known = dict(self._entries)
            position = self.position
            recheck = set(self._recheck)
        changelog = self.catalog_store.log
        if position is None:  # a new cache dir
            base = self._from_snapshot(started, known) or self._from_listing(started, known)
        elif time.monotonic() >= self._full_due:
            base = self._from_listing(started, known)
        else:
            entries = changelog.since(position)
            if entries is None:
                log.info("change log entries after %d were trimmed while this host was "
                         "away; starting from the newest catalog snapshot", position)
                base = self._from_snapshot(started, known) or self._from_listing(started, known)
            else:
                return self._from_entries(started, known, entries, position, recheck)
        # Then whatever the log gained since the listing or snapshot was taken.
        tail = changelog.since(base.position or 0) if base.position is not None else []
        if not tail:
            return base
        more = self._from_entries(started, {**known, **base.fetched}, tail, base.position,
                                  recheck)
        return dataclasses.replace(
            base, fetched={**base.fetched, **more.fetched}, position=more.position,
            gone=list(dict.fromkeys([*(i for i in base.gone if i not in more.fetched),
                                     *more.gone])))

    def _from_entries(self, started: int, known: dict[str, Versioned], entries: list[Entry],
                      position: int | None, recheck: set[str]) -> Changes:
        latest = {e.image_id: e.etag for e in entries}  # the last entry of each image wins
        stale = [i for i, etag in latest.items()
                 if not etag or known.get(i, ("",))[0] != etag] + sorted(recheck)
        fetched, gone = self.catalog_store.load_versions(stale)
        return Changes(started, fetched, [i for i in gone if i in known],
                       entries[-1].seq if entries else position, "log")

    def _from_listing(self, started: int, known: dict[str, Versioned]) -> Changes:
        """List every manifest; fetch those whose etag moved (the pre-log refresh)."""
        changelog = self.catalog_store.log
        newest = changelog.newest_snapshot()
        head = changelog.head(newest or 0)  # first: what the listing covers for sure
        etags = self.catalog_store.manifest_etags()
        store_id = self._vouch(etags, len(known))
        stale = [i for i, etag in etags.items() if known.get(i, ("",))[0] != etag]
        fetched = {i: (etags[i], m) for i, m in self.catalog_store.load_many(stale).items()}
        gone = self.catalog_store.confirm_gone(i for i in known if i not in etags)
        if self._repair:
            for image_id in [*(i for i in fetched if i in known), *gone]:
                changelog.append(image_id, fetched[image_id][0] if image_id in fetched else "")
            self._repair = False
        self._full_due = time.monotonic() + self.full_interval
        return Changes(started, fetched, gone, head, "listing", store_id)

    def _from_snapshot(self, started: int, known: dict[str, Versioned]) -> Changes | None:
        """The newest compacted catalog in the store, if there is one that decodes."""
        changelog = self.catalog_store.log
        seq = changelog.newest_snapshot()
        if seq is None:
            return None
        try:
            compacted = changelog.load_snapshot(seq)
        except ManifestDamaged as exc:
            log.error("%s; listing every manifest instead", exc)
            return None
        store_id = self._vouch({}, 0) if compacted.catalog else None
        if compacted.catalog and compacted.catalog != store_id:
            raise StoreUntrusted(f"{self.catalog_store.store.url}: catalog snapshot {seq} "
                                 f"belongs to catalog {compacted.catalog}, not {store_id}")
        self._compacted = max(self._compacted, seq)
        self._full_due = time.monotonic() + self.full_interval
        fetched: dict[str, Versioned] = {}
        for image_id, (etag, raw) in compacted.images.items():
            if known.get(image_id, ("",))[0] == etag:
                continue
            try:
                fetched[image_id] = (etag, mf.Manifest.decode(raw, f"manifest of image "
                                                              f"{image_id} in snapshot {seq}"))
            except ManifestDamaged as exc:
                log.error("%s; fetching it from the store", exc)
                fetched.update(self.catalog_store.load_versions([image_id])[0])
        # Absence is not evidence: only the store's own word removes an image.
        gone = self.catalog_store.confirm_gone(i for i in known if i not in compacted.images)
        return Changes(started, fetched, gone, seq, "snapshot", store_id)

    def _vouch(self, etags: dict[str, str], known: int) -> str | None:
        """The store's catalog id, if the store is the catalog this host knows."""
        identity = self.catalog_store.identity
        found = identity.read()
        if found is None:
            if etags:  # images but no marker: a store written by an older imagefs
                found = identity.stamp()
            elif known:
                raise StoreUntrusted(
                    f"{self.catalog_store.store.url} lists no images and has no {MARKER_KEY} "
                    f"(an NFS share that is not mounted looks like this); keeping the "
                    f"catalog of {known} images")
            else:
                return None
        identity.check(found)
        return found

    def apply_changes(self, changes: Changes) -> bool:
        """Memory and LMDB: apply what fetch_changes learnt; True if anything changed."""
        with self._lock:
            recent = {i for i, seq in self._changed_at.items() if seq > changes.started}
            self._recheck = (self._recheck - changes.fetched.keys() - set(changes.gone)) | \
                (recent & (changes.fetched.keys() | set(changes.gone)))
            changed = {i: v for i, v in changes.fetched.items()
                       if i not in recent and self._entries.get(i) != v}
            removed = [i for i in set(changes.gone) if i in self._entries and i not in recent]
            self._changed_at = {i: s for i, s in self._changed_at.items() if i in recent}
            if changed or removed:
                for image_id in removed:
                    del self._entries[image_id]
                self._entries.update(changed)
                self._publish()
            moved = changes.position is not None and changes.position != self.position
            if changes.position is not None:
                self.position = changes.position
        if changes.store_id is not None:
            self.catalog_store.identity.expected = changes.store_id
        if changed or removed or moved or changes.store_id != self.index.store_id:
            self.index.update(changed, removed, changes.store_id, changes.position)
        if changed or removed:
            log.info("catalog refreshed from the %s: %d changed, %d removed, %d images",
                     changes.how, len(changed), len(removed), len(self.snapshot.images))
        return bool(changed or removed)

    def compact(self) -> int | None:
        """Blocking: write a catalog snapshot if the log grew enough since the newest
        (so new hosts and long-offline ones start from it); its number, if written."""
        with self._lock:
            position = self.position
            # A small catalog is cheap to snapshot: do it sooner, so new hosts never
            # fetch its manifests one by one.
            every = min(SNAPSHOT_EVERY, max(len(self._entries), _SNAPSHOT_AT_LEAST))
            due = position is not None and position - self._compacted >= every
            complete = all(etag for etag, _m in self._entries.values())
            images = {i: (etag, m.encode()) for i, (etag, m) in self._entries.items()} \
                if due and complete else None
        if images is None or position is None:
            return None
        changelog = self.catalog_store.log
        self._compacted = max(self._compacted, changelog.newest_snapshot() or 0)
        if position - self._compacted < every:
            return None  # another host wrote one meanwhile
        changelog.write_snapshot(LogSnapshot(position, images, self.index.store_id))
        self._compacted = position
        return position

    def apply(self, manifest: mf.Manifest) -> None:
        """Show a change made here at once, before the next refresh reads it.

        The next refresh fetches the manifest again, so a change made elsewhere at the
        same time still wins in the end.
        """
        with self._lock:
            self._entries[manifest.record.id] = ("", manifest)
            self._note_change(manifest.record.id)
            self._recheck.add(manifest.record.id)
            self._publish()
        self.index.update({manifest.record.id: ("", manifest)}, [])

    def forget(self, image_id: str) -> None:
        with self._lock:
            if self._entries.pop(image_id, None) is None:
                return
            self._note_change(image_id)
            self._publish()
        self.index.update({}, [image_id])

    def _note_change(self, image_id: str) -> None:
        self._change_seq += 1
        self._changed_at[image_id] = self._change_seq

    def _publish(self) -> None:
        images = {i: m for i, (_etag, m) in self._entries.items()}
        self.snapshot = Snapshot(self.snapshot.generation + 1, images)
