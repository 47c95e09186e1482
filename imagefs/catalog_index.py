"""The catalog mirrored in LMDB: manifests and block tables, so a mount can start offline.

Disposable like the rest of the cache: every entry is checked when it is read, and a
damaged one is dropped (and fetched again from the store) instead of failing the mount.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import lmdb
import msgpack

from imagefs import manifest as mf
from imagefs.cache import PINS_DB
from imagefs.errors import ManifestDamaged

log = logging.getLogger(__name__)


class CatalogIndex:
    def __init__(self, env: lmdb.Environment, store_url: str) -> None:
        self.env = env
        self._manifests = env.open_db(b"catalog")
        self._blocks = env.open_db(b"blocks")
        self._meta = env.open_db(b"catalog_meta")
        pins = env.open_db(PINS_DB)
        with env.begin(write=True, db=self._meta) as txn:
            owner = txn.get(b"store")
            if owner is not None and bytes(owner).decode(errors="replace") != store_url:
                log.warning("cache held the catalog of %s; dropping it and its pins for %s",
                            bytes(owner).decode(errors="replace"), store_url)
                txn.drop(self._manifests, delete=False)
                txn.drop(pins, delete=False)  # pins name images of that catalog
                txn.delete(b"store_id")
                txn.delete(b"log_position")
            txn.put(b"store", store_url.encode())
            raw_id = txn.get(b"store_id")
            raw_position = txn.get(b"log_position")
        # The id of the store's catalog as last seen (see store_identity.py).
        self.store_id: str | None = bytes(raw_id).decode() if raw_id else None
        # The change log entry the cached catalog is up to date with (change_log.py).
        self.log_position: int | None = int(bytes(raw_position)) if raw_position else None

    def mark_running(self) -> bool:
        """Note that a daemon uses this cache now; True if the last one never said it
        stopped (it was killed, maybe between a manifest write and its log entry)."""
        with self.env.begin(write=True, db=self._meta) as txn:
            crashed = txn.get(b"running") is not None
            txn.put(b"running", b"1")
        return crashed

    def mark_stopped(self) -> None:
        with self.env.begin(write=True, db=self._meta) as txn:
            txn.delete(b"running")

    def load(self) -> dict[str, tuple[str, mf.Manifest]]:
        """Image id -> (etag, manifest); damaged rows are dropped with a warning."""
        entries = {}
        damaged = []
        with self.env.begin(db=self._manifests) as txn:
            for key, value in txn.cursor():
                try:
                    image_id = bytes(key).decode()
                    etag, raw = msgpack.unpackb(value)
                    entries[image_id] = (str(etag), mf.Manifest.decode(raw))
                except Exception as exc:
                    log.warning("dropping a damaged catalog row from the cache (%s); the "
                                "next refresh fetches it again", exc)
                    damaged.append(bytes(key))
        if damaged:  # the log position no longer vouches for the rows: list everything
            with self.env.begin(write=True) as txn:
                for key in damaged:
                    txn.delete(key, db=self._manifests)
                txn.delete(b"log_position", db=self._meta)
            self.log_position = None
        return entries

    def update(self, changed: dict[str, tuple[str, mf.Manifest]], removed: Iterable[str],
               store_id: str | None = None, log_position: int | None = None) -> None:
        """One transaction, so the log position never runs ahead of the rows."""
        with self.env.begin(write=True) as txn:
            for image_id, (etag, manifest) in changed.items():
                txn.put(image_id.encode(), msgpack.packb([etag, manifest.encode()]),
                        db=self._manifests)
            for image_id in removed:
                txn.delete(image_id.encode(), db=self._manifests)
            if store_id is not None and store_id != self.store_id:
                txn.put(b"store_id", store_id.encode(), db=self._meta)
            if log_position is not None:
                txn.put(b"log_position", str(log_position).encode(), db=self._meta)
        if store_id is not None:
            self.store_id = store_id
        if log_position is not None:
            self.log_position = log_position

    def block_table(self, manifest: mf.Manifest) -> bytes | None:
        """The cached block table if it is the one the manifest names, else None."""
        key = self._blocks_key(manifest)
        with self.env.begin(db=self._blocks) as txn:
            raw = txn.get(key)
            table = bytes(raw) if raw is not None else None
        if table is None:
            return None
        try:
            return mf.check_block_table(manifest, table)
        except ManifestDamaged:
            log.error("cached block table of image %s is damaged; fetching it again",
                      manifest.record.id)
            with self.env.begin(write=True, db=self._blocks) as txn:
                txn.delete(key)
            return None

    def put_block_table(self, manifest: mf.Manifest, table: bytes) -> None:
        with self.env.begin(write=True, db=self._blocks) as txn:
            txn.put(self._blocks_key(manifest), table)

    @staticmethod
    def _blocks_key(manifest: mf.Manifest) -> bytes:
        return f"{manifest.record.id}:{manifest.blocks_sha256}".encode()
