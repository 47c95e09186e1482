"""The upload pipeline shared by `imagefs image create` and (later) the inbox.

One pass over the data: inspect -> hash (md5, sha512, per-block sha256) -> upload. The
manifest is written last, so an image is visible only once its data is complete.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from imagefs import manifest as mf
from imagefs.inspect_format import FormatDetector
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


def upload_image(store: Store, source: IO[bytes], record: ImageRecord, block_size: int,
                 progress: Callable[[int], None] = lambda n: None) -> mf.Manifest:
    """Upload `source` as the data of `record` and publish it; returns the manifest.

    Raises UnsafeImage (nothing is left in the store) if inspection refuses the data.
    """
    detector = FormatDetector(source, record.disk_format)
    hashes = _Hashes(block_size)
    writer = store.open_writer(mf.data_key(record.id))
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
        raise
    table = hashes.finish()
    record.disk_format = detected.disk_format
    record.virtual_size = detected.virtual_size
    record.container_format = record.container_format or "bare"
    record.size = size
    record.checksum = hashes.md5.hexdigest()
    record.os_hash_algo = "sha512"
    record.os_hash_value = hashes.sha512.hexdigest()
    record.status = "active"
    record.updated_at = now_us()
    manifest = mf.Manifest(record=record, block_size=block_size,
                           blocks_sha256=hashlib.sha256(table).hexdigest())
    try:
        store.put(mf.blocks_key(record.id), table)
        store.put(mf.manifest_key(record.id), manifest.encode())
    except BaseException:
        for key in (mf.blocks_key(record.id), mf.data_key(record.id)):
            try:
                store.delete(key)
            except Exception as exc:
                log.warning("could not remove %s after a failed upload: %s", key, exc)
        raise
    log.info("published image %s (%s, %d bytes, %s)", record.id, record.name, size,
             record.disk_format)
    return manifest
