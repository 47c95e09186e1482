"""Verified reads of image data: memory -> LMDB chunk cache -> ranged GETs from the store.

Every block is checked against the sha256 recorded at upload before it is cached or
returned. Concurrent misses of one chunk share one fetch (single-flight); sequential
readers get a prefetch window that grows while they stay sequential and resets on seek.
All blocking work runs in worker threads under explicit capacity limiters.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from imagefs import manifest as mf
from imagefs.cache import ChunkCache, chunk_key
from imagefs.catalog import CatalogIndex, CatalogStore
from imagefs.errors import ChunkCorrupted, ImagefsError

log = logging.getLogger(__name__)
_MAX_PENDING_WRITES = 8  # chunks waiting for the LMDB writer; bounds their memory


@dataclass
class ReadStats:
    store_requests: int = 0
    store_bytes: int = 0
    lmdb_hits: int = 0
    memory_hits: int = 0
    corrupt_chunks: int = 0
    damaged_cache_entries: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Stream:
    """Per-open-file read pattern, for sequential detection and prefetch."""

    next_offset: int = 0
    run: int = 0
    prefetched_to: int = 0


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


class _MemoryChunks:
    """A byte-bounded LRU of verified chunks, so hot chunks are not re-hashed per read."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: bytes) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def put(self, key: bytes, data: bytes) -> None:
        if key in self._items or len(data) > self.capacity:
            return
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self.capacity:
            _key, old = self._items.popitem(last=False)
            self._bytes -= len(old)


class ImageReader:
    def __init__(self, catalog_store: CatalogStore, index: CatalogIndex, cache: ChunkCache,
                 chunk_size: int, memory_cache: int, prefetch_max: int,
                 store_limit: int = 16) -> None:
        self.catalog_store = catalog_store
        self.index = index
        self.cache = cache
        self.chunk_size = chunk_size
        self.prefetch_max = prefetch_max
        self.stats = ReadStats()
        self._memory = _MemoryChunks(memory_cache)
        self._tables: OrderedDict[str, bytes] = OrderedDict()
        self._table_locks: dict[str, trio.Lock] = {}
        self._flights: dict[bytes, _Flight] = {}
        self._store_limiter = trio.CapacityLimiter(store_limit)
        self._cpu_limiter = trio.CapacityLimiter(2)
        self._lmdb_read_limiter = trio.CapacityLimiter(8)
        self._lmdb_write_limiter = trio.CapacityLimiter(1)
        self._prefetch_slots = trio.Semaphore(max(store_limit // 2, 1))
        self._nursery: trio.Nursery | None = None
        self._pending_writes = 0

    def start(self, nursery: trio.Nursery) -> None:
        """Background work (prefetch, cache writes) runs in the daemon's nursery."""
        self._nursery = nursery

    async def drain(self) -> None:
        """Wait until fetched chunks are all written to the cache (before unmounting)."""
        while self._pending_writes:
            await trio.sleep(0.01)

    def image_chunk_size(self, manifest: mf.Manifest) -> int:
        block = manifest.block_size
        return max(block, self.chunk_size // block * block)

    # -- the read path ------------------------------------------------------------------

    async def read(self, manifest: mf.Manifest, offset: int, size: int,
                   stream: Stream | None = None) -> bytes:
        image_size = manifest.record.size or 0
        end = min(offset + size, image_size)
        if offset >= end:
            return b""
        chunk = self.image_chunk_size(manifest)
        first, last = offset // chunk, (end - 1) // chunk
        parts = []
        for index in range(first, last + 1):
            data = await self.chunk(manifest, index)
            start = max(offset - index * chunk, 0)
            stop = min(end - index * chunk, len(data))
            parts.append(data[start:stop])
        if stream is not None:
            self._after_read(manifest, stream, offset, end)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunk(self, manifest: mf.Manifest, index: int) -> bytes:
        record = manifest.record
        chunk = self.image_chunk_size(manifest)
        key = chunk_key(record.id, record.os_hash_value or "", chunk, index)
        data = self._memory.get(key)
        if data is not None:
            self.stats.memory_hits += 1
            return data
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.data is not None:
                return flight.data
            if flight.error is not None:  # else the fetcher was cancelled: try ourselves
                raise flight.error
        flight = self._flights[key] = _Flight()
        try:
            flight.data = await self._load(manifest, index, key)
            self._memory.put(key, flight.data)
            return flight.data
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    async def _load(self, manifest: mf.Manifest, index: int, key: bytes) -> bytes:
        table = await self.block_table(manifest)
        cached = await trio.to_thread.run_sync(self.cache.get, key,
                                               limiter=self._lmdb_read_limiter)
        if cached is not None:
            bad = await trio.to_thread.run_sync(self._bad_block, manifest, table, index, cached,
                                                limiter=self._cpu_limiter)
            if bad is None:
                self.stats.lmdb_hits += 1
                return cached
            self.stats.damaged_cache_entries += 1
            log.error("cached chunk %d of image %s failed verification; refetching",
                      index, manifest.record.id)
            await trio.to_thread.run_sync(self.cache.discard, key,
                                          limiter=self._lmdb_write_limiter)
        chunk = self.image_chunk_size(manifest)
        start = index * chunk
        length = min(chunk, (manifest.record.size or 0) - start)
        data = await trio.to_thread.run_sync(
            self.catalog_store.store.get_range, mf.data_key(manifest.record.id), start,
            length, limiter=self._store_limiter, abandon_on_cancel=True)
        self.stats.store_requests += 1
        self.stats.store_bytes += len(data)
        bad = await trio.to_thread.run_sync(self._bad_block, manifest, table, index, data,
                                            limiter=self._cpu_limiter)
        if bad is not None:
            self.stats.corrupt_chunks += 1
            log.error("image %s: block %d does not match the hash recorded at upload; the "
                      "store's copy is corrupt (read answered EIO)", manifest.record.id, bad)
            raise ChunkCorrupted(f"image {manifest.record.id}: block {bad} is corrupt")
        if self._pending_writes < _MAX_PENDING_WRITES and self._nursery is not None:
            self._pending_writes += 1
            self._nursery.start_soon(self._write_back, key, data)
        else:  # the cache is slower than the store: let the reader wait (backpressure)
            self._pending_writes += 1
            await self._write_back(key, data)
        return data

    def _bad_block(self, manifest: mf.Manifest, table: bytes, index: int,
                   data: bytes) -> int | None:
        """The number of the first block of chunk `index` that fails its hash, or None."""
        block = manifest.block_size
        first = index * self.image_chunk_size(manifest) // block
        expected_len = min(self.image_chunk_size(manifest),
                           (manifest.record.size or 0) - index * self.image_chunk_size(manifest))
        if len(data) != expected_len:
            return first
        view = memoryview(data)
        for n, pos in enumerate(range(0, len(data), block)):
            digest = hashlib.sha256(view[pos:pos + block]).digest()
            number = first + n
            if digest != table[number * mf.DIGEST_SIZE:(number + 1) * mf.DIGEST_SIZE]:
                return number
        return None

    async def _write_back(self, key: bytes, data: bytes) -> None:
        try:
            await trio.to_thread.run_sync(self.cache.put, key, data,
                                          limiter=self._lmdb_write_limiter)
        except Exception:
            log.exception("could not write a chunk to the cache; it stays uncached")
        finally:
            self._pending_writes -= 1

    async def block_table(self, manifest: mf.Manifest) -> bytes:
        """The block hashes of an image: memory, then the LMDB index, then the store."""
        image_id = manifest.record.id
        table = self._tables.get(image_id)
        if table is not None and self._table_matches(manifest, table):
            self._tables.move_to_end(image_id)
            return table
        lock = self._table_locks.setdefault(image_id, trio.Lock())
        async with lock:
            table = self._tables.get(image_id)
            if table is None or not self._table_matches(manifest, table):
                table = await trio.to_thread.run_sync(self.index.block_table, manifest)
                if table is None:
                    table = await trio.to_thread.run_sync(
                        self.catalog_store.block_table, manifest,
                        limiter=self._store_limiter, abandon_on_cancel=True)
                    await trio.to_thread.run_sync(self.index.put_block_table, manifest, table,
                                                  limiter=self._lmdb_write_limiter)
                self._tables[image_id] = table
                while len(self._tables) > 256:
                    self._tables.popitem(last=False)
        self._table_locks.pop(image_id, None)  # waiters hold it; later callers hit _tables
        return table

    @staticmethod
    def _table_matches(manifest: mf.Manifest, table: bytes) -> bool:
        return len(table) == manifest.block_count * mf.DIGEST_SIZE

    # -- prefetch -----------------------------------------------------------------------

    def _after_read(self, manifest: mf.Manifest, stream: Stream, offset: int, end: int) -> None:
        """Prefetch ahead of a sequential reader as far as it has read sequentially.

        The window grows with the run (a 1 MiB read prefetches about 1 MiB, a backup
        reading gigabytes prefetches `prefetch_max`), and a seek resets it.
        """
        if offset == stream.next_offset:
            stream.run += end - offset
        else:
            stream.run = end - offset
            stream.prefetched_to = 0
        stream.next_offset = end
        if self._nursery is None:
            return
        chunk = self.image_chunk_size(manifest)
        target = min(end + min(stream.run, self.prefetch_max), manifest.record.size or 0)
        start = max(stream.prefetched_to, end)
        for index in range(start // chunk, -(-target // chunk)):
            self._nursery.start_soon(self._prefetch, manifest, index)
        stream.prefetched_to = max(stream.prefetched_to, target)

    async def _prefetch(self, manifest: mf.Manifest, index: int) -> None:
        record = manifest.record
        key = chunk_key(record.id, record.os_hash_value or "",
                        self.image_chunk_size(manifest), index)
        if key in self._memory or key in self._flights:
            return
        async with self._prefetch_slots:
            try:
                await self.chunk(manifest, index)
            except ImagefsError as exc:
                log.debug("prefetch of chunk %d of %s failed: %s", index, record.id, exc)
            except Exception:
                log.exception("prefetch of chunk %d of %s failed", index, record.id)
