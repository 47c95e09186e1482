"""Catalog operations against the store: list, load, save and delete manifests.

Blocking, and shared by the CLI and the daemon. Saves of existing manifests are
conditional on the version that was read, so two writers (two FUSE requests, a CLI and
a mount, two hosts) never silently overwrite each other's change. Every write is then
recorded in the change log (change_log.py), which is how other hosts learn of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from imagefs import manifest as mf
from imagefs.change_log import ChangeLog
from imagefs.errors import (ImageNotFound, ManifestDamaged, ObjectChanged, ObjectNotFound,
                            StoreError)
from imagefs.parallel import parallel
from imagefs.records import now_us
from imagefs.store_identity import StoreIdentity
from imagefs.stores import Store

log = logging.getLogger(__name__)
Versioned = tuple[str, mf.Manifest]  # (etag, manifest)


class CatalogStore:
    def __init__(self, store: Store, expected_id: str | None = None) -> None:
        self.store = store
        self.identity = StoreIdentity(store, expected_id)
        self.log = ChangeLog(store, self.identity)

    def manifest_etags(self) -> dict[str, str]:
        etags = {}
        for info in self.store.list(mf.MANIFEST_PREFIX):
            image_id = mf.image_id_of(info.key)
            if image_id:
                etags[image_id] = info.etag
        return etags

    def load(self, image_id: str) -> mf.Manifest:
        return self.load_versioned(image_id)[0]

    def load_versioned(self, image_id: str) -> tuple[mf.Manifest, str]:
        """The manifest and its etag, for a conditional save()."""
        try:
            raw, etag = self.store.get_versioned(mf.manifest_key(image_id))
        except ObjectNotFound:
            raise ImageNotFound(f"no image with id {image_id}") from None
        return mf.Manifest.decode(raw, f"manifest of image {image_id}"), etag

    def load_all(self) -> list[mf.Manifest]:
        return list(self.load_many(self.manifest_etags()).values())

    def load_many(self, image_ids: Iterable[str]) -> dict[str, mf.Manifest]:
        """Fetch manifests in parallel; a damaged or vanished one is logged and skipped."""
        return {i: manifest for i, (_etag, manifest) in self.load_versions(image_ids)[0].items()}

    def load_versions(self, image_ids: Iterable[str]) -> tuple[dict[str, Versioned], list[str]]:
        """Fetch manifests with their etags, in parallel: (found, ids the store says are
        gone). A damaged manifest is logged and left out of both."""
        gone: list[str] = []

        def fetch(image_id: str) -> Versioned | None:
            try:
                manifest, etag = self.load_versioned(image_id)
                return etag, manifest
            except ImageNotFound:
                gone.append(image_id)
            except ManifestDamaged as exc:
                log.error("%s; the image is left out of the catalog", exc)
            return None

        return parallel(fetch, image_ids), gone

    def confirm_gone(self, image_ids: Iterable[str]) -> list[str]:
        """Of images a listing did not show, those whose manifest the store says is gone.

        A listing can miss keys (a damaged answer, a store that is not what it seems);
        only the store's positive "no such object" removes an image.
        """
        present = parallel(lambda i: self.store.exists(mf.manifest_key(i)), image_ids)
        return [i for i, there in present.items() if not there]

    def save(self, manifest: mf.Manifest, etag: str) -> str:
        """Rewrite a manifest read at version `etag`; ObjectChanged if it moved since.

        Returns the new etag."""
        manifest.record.validate()
        manifest.record.updated_at = now_us()
        new_etag = self.store.put(mf.manifest_key(manifest.record.id), manifest.encode(),
                                  if_match=etag)
        self._record(manifest.record.id, new_etag)
        return new_etag

    def create(self, manifest: mf.Manifest) -> None:
        """Write the manifest of a new image: the commit point of an upload.

        A retried put whose first try landed finds its own manifest there: that is
        success. Anything else already under the id is left alone (ObjectChanged).
        """
        self.identity.ensure_for_write()
        try:
            etag = self.store.put(mf.manifest_key(manifest.record.id), manifest.encode(),
                                  if_absent=True)
        except ObjectChanged:
            there, etag = self.load_versioned(manifest.record.id)
            if (there.blocks_sha256, there.record.os_hash_value) != \
                    (manifest.blocks_sha256, manifest.record.os_hash_value):
                raise
        self._record(manifest.record.id, etag)

    def delete(self, image_id: str) -> None:
        """Remove the manifest first (the image vanishes at once), then its data."""
        self.store.delete(mf.manifest_key(image_id))
        self._record(image_id, "")
        for key in (mf.blocks_key(image_id), mf.data_key(image_id)):
            self.store.delete(key)

    def _record(self, image_id: str, etag: str) -> None:
        """Log a manifest change for other hosts; the change itself is done already.

        A failure here must not fail the change (retrying it would conflict with
        itself): other hosts then see it at their next full listing.
        """
        try:
            self.log.append(image_id, etag)
        except StoreError as exc:
            log.warning("image %s changed, but the change log could not record it (%s); "
                        "other hosts see the change at their next full refresh",
                        image_id, exc)

    def sweep(self, older_than: float) -> int:
        """Remove data and block tables no manifest names, once older than `older_than` s.

        They are what uploads and purges cut short by a crash leave: an upload writes
        its manifest seconds after its data, so a day-old object without one is garbage.
        Returns how many objects went (store temporaries included).
        """
        cutoff = time.time() - older_than
        named = set(self.manifest_etags())
        removed = self.store.remove_stale_temporaries(older_than)
        for prefix in (mf.DATA_PREFIX, mf.BLOCKS_PREFIX):
            for info in list(self.store.list(prefix)):
                image_id = info.key[len(prefix):]
                if image_id not in named and info.modified < cutoff:
                    log.info("removing %s: no manifest names it (left by a crash)", info.key)
                    self.store.delete(info.key)
                    removed += 1
        return removed

    def block_table(self, manifest: mf.Manifest) -> bytes:
        return mf.check_block_table(manifest, self.store.get(mf.blocks_key(manifest.record.id)))
