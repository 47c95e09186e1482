"""The upload pipeline shared by `imagefs image create` and the inbox.

Two steps. `stage_data` makes one pass over the data: inspect, hash (md5, sha512, sha256
per block) and upload, all at once. `publish` checks the result against the record's
declared format and writes the block table and then the manifest, so an image is visible
only once its data is complete. The inbox runs `stage_data` while a file is still being
written (see inbox/streaming.py) and `publish` once it has settled.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from imagefs import manifest as mf
from imagefs.catalog_store import CatalogStore
from imagefs.errors import ObjectChanged
from imagefs.inspect_format import Detected, FormatDetector, check_declared
from imagefs.records import ImageRecord, now_us
from imagefs.stores import Store

log = logging.getLogger(__name__)
READ_SIZE = 8 << 20


class _Hashes:
    """md5 and sha512 on two worker threads (hashlib drops the GIL), blocks inline."""

    def __init__(self, block_size: int) -> None:
        self.md5 = hashlib.md5()
        self.sha512 = hashlib.sha512()
        self.block_size = block_size
        self.blocks = bytearray()
        self._partial = hashlib.sha256()
        self._partial_len = 0
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="hash")

    def update(self, data: bytes) -> None:
        jobs = [self._pool.submit(self.md5.update, data),
                self._pool.submit(self.sha512.update, data)]
        view = memoryview(data)
        while view:
            take = min(len(view), self.block_size - self._partial_len)
            self._partial.update(view[:take])
            self._partial_len += take
            view = view[take:]
            if self._partial_len == self.block_size:
                self._close_block()
        for job in jobs:
            job.result()

    def _close_block(self) -> None:
        self.blocks += self._partial.digest()
        self._partial = hashlib.sha256()
        self._partial_len = 0

    def finish(self) -> bytes:
        if self._partial_len:
            self._close_block()
        self._pool.shutdown()
        return bytes(self.blocks)


@dataclass(frozen=True)
class StagedData:
    """Image data that is in the store, with what was learnt while it streamed."""

    image_id: str
    size: int
    md5: str
    sha512: str
    block_size: int
    table: bytes
    detected: Detected


def stage_data(store: Store, source: IO[bytes], image_id: str, block_size: int,
               progress: Callable[[int], None] = lambda n: None) -> StagedData:
    """Inspect, hash and upload `source` as data/<image_id>; nothing is visible yet.

    Raises UnsafeImage (and leaves nothing in the store) if inspection refuses it.
    """
    detector = FormatDetector(source)
    hashes = _Hashes(block_size)
    writer = store.open_writer(mf.data_key(image_id))
    size = 0
    try:
        while piece := detector.read(READ_SIZE):
            hashes.update(piece)
            writer.write(piece)
            size += len(piece)
            progress(len(piece))
        detected = detector.finish()
        writer.commit()
    except BaseException:
        writer.abort()
        hashes.finish()
        raise
    return StagedData(image_id, size, hashes.md5.hexdigest(), hashes.sha512.hexdigest(),
                      block_size, hashes.finish(), detected)


def discard(store: Store, image_id: str) -> None:
    """Remove what staging and a failed publish may have left; never raises.

    The manifest goes first: a put that failed may still have landed, and a manifest
    must never outlive its data.
    """
    for key in (mf.manifest_key(image_id), mf.blocks_key(image_id), mf.data_key(image_id)):
        try:
            store.delete(key)
        except Exception as exc:
            log.warning("could not remove %s after a failed upload: %s", key, exc)


def publish(catalog_store: CatalogStore, record: ImageRecord,
            staged: StagedData) -> mf.Manifest:
    """Make staged data the image `record`: block table, then manifest (the commit)."""
    assert record.id == staged.image_id
    store = catalog_store.store
    try:
        record.disk_format = check_declared(record.disk_format, staged.detected)
        record.virtual_size = staged.detected.virtual_size
        record.container_format = record.container_format or "bare"
        record.size = staged.size
        record.checksum = staged.md5
        record.os_hash_algo = "sha512"
        record.os_hash_value = staged.sha512
        record.status = "active"
        record.updated_at = now_us()
        record.validate()
        manifest = mf.Manifest(record=record, block_size=staged.block_size,
                               blocks_sha256=hashlib.sha256(staged.table).hexdigest())
        store.put(mf.blocks_key(record.id), staged.table)
        catalog_store.create(manifest)
    except ObjectChanged:
        raise  # another image holds the id: nothing of ours to clean up, nothing of theirs
    except BaseException:
        discard(store, record.id)
        raise
    log.info("published image %s (%s, %d bytes, %s)", record.id, record.name, staged.size,
             record.disk_format)
    return manifest


def upload_image(catalog_store: CatalogStore, source: IO[bytes], record: ImageRecord,
                 block_size: int,
                 progress: Callable[[int], None] = lambda n: None) -> mf.Manifest:
    """Stage and publish in one go (the CLI's `image create`)."""
    catalog_store.identity.ensure_for_write()  # before any data goes to the wrong place
    staged = stage_data(catalog_store.store, source, record.id, block_size, progress)
    return publish(catalog_store, record, staged)
