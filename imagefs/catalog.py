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

from imagefs import manifest as mf
from imagefs.catalog_index import CatalogIndex
from imagefs.catalog_store import CatalogStore
from imagefs.errors import StoreUntrusted
from imagefs.records import ImageRecord
from imagefs.store_identity import MARKER_KEY

log = logging.getLogger(__name__)


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

    started: int  # the local change sequence number when the listing began
    listed: int
    fetched: dict[str, tuple[str, mf.Manifest]]
    gone: list[str]
    store_id: str | None


class Catalog:
    """The daemon's catalog: a snapshot swapped atomically by each change."""

    def __init__(self, catalog_store: CatalogStore, index: CatalogIndex) -> None:
        self.catalog_store = catalog_store
        self.index = index
        self._entries: dict[str, tuple[str, mf.Manifest]] = {}
        self._lock = threading.Lock()
        # Local changes since a refresh began must not be undone by what it listed.
        self._change_seq = 0
        self._changed_at: dict[str, int] = {}
        self.snapshot = Snapshot(0, {})

    def load_cached(self) -> int:
        """Start from the LMDB index (used when the store is unreachable at mount)."""
        with self._lock:
            self._entries = self.index.load()
            self._publish()
        return len(self._entries)

    def refresh(self) -> bool:
        """Bring the snapshot up to date with the store; True if anything changed."""
        return self.apply_changes(self.fetch_changes())

    def fetch_changes(self) -> Changes:
        """Blocking, store only: list manifests and fetch those whose etag moved."""
        with self._lock:
            started = self._change_seq
            known = dict(self._entries)
        etags = self.catalog_store.manifest_etags()
        store_id = self._vouch(etags, len(known))
        stale = [i for i, etag in etags.items() if known.get(i, (None,))[0] != etag]
        fetched = {i: (etags[i], m) for i, m in self.catalog_store.load_many(stale).items()}
        gone = self.catalog_store.confirm_gone(i for i in known if i not in etags)
        return Changes(started, len(etags), fetched, gone, store_id)

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
            changed = {i: v for i, v in changes.fetched.items() if i not in recent}
            removed = [i for i in changes.gone if i in self._entries and i not in recent]
            self._changed_at = {i: s for i, s in self._changed_at.items() if i in recent}
            if changed or removed:
                for image_id in removed:
                    del self._entries[image_id]
                self._entries.update(changed)
                self._publish()
        if changes.store_id is not None:
            self.catalog_store.identity.expected = changes.store_id
        if changed or removed or changes.store_id != self.index.store_id:
            self.index.update(changed, removed, changes.store_id)
        if changed or removed:
            log.info("catalog refreshed: %d changed, %d removed, %d images",
                     len(changed), len(removed), changes.listed)
        return bool(changed or removed)

    def apply(self, manifest: mf.Manifest) -> None:
        """Show a change made here at once, before the next refresh lists it.

        The empty etag makes a later refresh fetch the manifest again, so a change made
        elsewhere at the same time still wins in the end.
        """
        with self._lock:
            self._entries[manifest.record.id] = ("", manifest)
            self._note_change(manifest.record.id)
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
