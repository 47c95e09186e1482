"""The image catalog: manifests in the store, an index of them in LMDB, a snapshot in memory.

`CatalogStore` does catalog operations against the store (used by the CLI and the
daemon). `Catalog` keeps the daemon's current view: a refresh lists manifests, fetches only
the ones whose etag changed, and mirrors them into the LMDB index so a mount can come up
(read-only, from cache) while the store is unreachable.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import lmdb
import msgpack

from imagefs import manifest as mf
from imagefs.errors import ImageNotFound, ManifestDamaged, ObjectNotFound
from imagefs.records import ImageRecord, now_us
from imagefs.stores import Store

log = logging.getLogger(__name__)


class CatalogStore:
    """Catalog operations against the store. Blocking; the CLI acts as an admin."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def manifest_etags(self) -> dict[str, str]:
        etags = {}
        for info in self.store.list(mf.MANIFEST_PREFIX):
            image_id = mf.image_id_of(info.key)
            if image_id:
                etags[image_id] = info.etag
        return etags

    def load(self, image_id: str) -> mf.Manifest:
        try:
            raw = self.store.get(mf.manifest_key(image_id))
        except ObjectNotFound:
            raise ImageNotFound(f"no image with id {image_id}") from None
        return mf.Manifest.decode(raw, f"manifest of image {image_id}")

    def load_all(self) -> list[mf.Manifest]:
        return list(self.load_many(self.manifest_etags()).values())

    def load_many(self, image_ids: Iterable[str]) -> dict[str, mf.Manifest]:
        """Fetch manifests in parallel; a damaged or vanished one is logged and skipped."""

        def fetch(image_id: str) -> mf.Manifest | None:
            try:
                return self.load(image_id)
            except ImageNotFound:
                return None
            except ManifestDamaged as exc:
                log.error("%s; the image is left out of the catalog", exc)
                return None

        ids = list(image_ids)
        with ThreadPoolExecutor(max_workers=8) as pool:
            loaded = pool.map(fetch, ids)
            return {i: m for i, m in zip(ids, loaded, strict=True) if m is not None}

    def save(self, manifest: mf.Manifest) -> None:
        """Rewrite a manifest (metadata change); the data and block table stay."""
        manifest.record.validate()
        manifest.record.updated_at = now_us()
        self.store.put(mf.manifest_key(manifest.record.id), manifest.encode())

    def delete(self, image_id: str) -> None:
        """Remove the manifest first (the image vanishes at once), then its data."""
        self.store.delete(mf.manifest_key(image_id))
        for key in (mf.blocks_key(image_id), mf.data_key(image_id)):
            self.store.delete(key)

    def block_table(self, manifest: mf.Manifest) -> bytes:
        return mf.check_block_table(manifest, self.store.get(mf.blocks_key(manifest.record.id)))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One consistent view of the catalog; `generation` changes whenever it does."""

    generation: int
    images: dict[str, mf.Manifest]

    def record(self, image_id: str) -> ImageRecord | None:
        manifest = self.images.get(image_id)
        return manifest.record if manifest else None


class CatalogIndex:
    """Manifests and block tables mirrored in LMDB; rebuilt from the store at will."""

    def __init__(self, env: lmdb.Environment, store_url: str) -> None:
        self.env = env
        self._manifests = env.open_db(b"catalog")
        self._blocks = env.open_db(b"blocks")
        meta = env.open_db(b"catalog_meta")
        with env.begin(write=True, db=meta) as txn:
            owner = txn.get(b"store")
            if owner is not None and owner.decode() != store_url:
                log.warning("cache held the catalog of %s; dropping it for %s",
                            owner.decode(), store_url)
                txn.drop(self._manifests, delete=False)
            txn.put(b"store", store_url.encode())

    def load(self) -> dict[str, tuple[str, mf.Manifest]]:
        entries = {}
        with self.env.begin(db=self._manifests) as txn:
            for key, value in txn.cursor():
                etag, raw = msgpack.unpackb(value)
                try:
                    entries[key.decode()] = (etag, mf.Manifest.decode(raw))
                except ManifestDamaged as exc:
                    log.warning("skipping damaged cached manifest %s: %s", key.decode(), exc)
        return entries

    def update(self, changed: dict[str, tuple[str, mf.Manifest]], removed: Iterable[str]) -> None:
        with self.env.begin(write=True, db=self._manifests) as txn:
            for image_id, (etag, manifest) in changed.items():
                txn.put(image_id.encode(), msgpack.packb([etag, manifest.encode()]))
            for image_id in removed:
                txn.delete(image_id.encode())

    def block_table(self, manifest: mf.Manifest) -> bytes | None:
        with self.env.begin(db=self._blocks) as txn:
            raw = txn.get(self._blocks_key(manifest))
        return bytes(raw) if raw is not None else None

    def put_block_table(self, manifest: mf.Manifest, table: bytes) -> None:
        with self.env.begin(write=True, db=self._blocks) as txn:
            txn.put(self._blocks_key(manifest), table)

    @staticmethod
    def _blocks_key(manifest: mf.Manifest) -> bytes:
        return f"{manifest.record.id}:{manifest.blocks_sha256}".encode()


class Catalog:
    """The daemon's catalog: a snapshot swapped atomically by refresh()."""

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
        with self._lock:
            started = self._change_seq
        etags = self.catalog_store.manifest_etags()
        with self._lock:
            known = dict(self._entries)
        stale = [i for i, etag in etags.items() if known.get(i, (None,))[0] != etag]
        fetched = self.catalog_store.load_many(stale)
        with self._lock:
            recent = {i for i, seq in self._changed_at.items() if seq > started}
            changed = {i: (etags[i], fetched[i]) for i in fetched if i not in recent}
            removed = [i for i in self._entries if i not in etags and i not in recent]
            self._changed_at = {i: s for i, s in self._changed_at.items() if i in recent}
            if changed or removed:
                for image_id in removed:
                    del self._entries[image_id]
                self._entries.update(changed)
                self._publish()
        if not changed and not removed:
            return False
        self.index.update(changed, removed)
        log.info("catalog refreshed: %d changed, %d removed, %d images",
                 len(changed), len(removed), len(etags))
        return True

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
