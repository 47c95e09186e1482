"""Verified reads of image data: memory -> LMDB chunk cache -> ranged GETs from the store.

The unit of fetching and caching is the chunk (4 MiB by default). A chunk from the store
is checked block by block (the manifest's block size, 256 KiB by default) against the
sha256 recorded at upload before it is kept or returned; the LMDB cache then protects
its copy with its own page checksums (cache.py), so a 4 KiB read served from LMDB copies
and checks 4 KiB. Chunks fetched or prefetched stay in a memory LRU, and reads of them
are views, not copies. Concurrent misses share one fetch (single-flight); sequential
readers get a prefetch window that grows while they stay sequential and resets on seek.
All blocking work runs in worker threads under explicit capacity limiters.

Every read answers within `read_timeout`: store calls run in threads that are abandoned
(and counted) when they outlive it, and the read then answers StoreUnavailable (EIO).
Cached blocks never wait on the store, so they stay readable through an outage.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from prometheus_client import Histogram

from imagefs import manifest as mf
from imagefs.blocking import BlockingCalls
from imagefs.cache import ChunkCache, chunk_suffix, image_prefix
from imagefs.catalog_index import CatalogIndex
from imagefs.catalog_store import CatalogStore
from imagefs.errors import (ChunkCorrupted, ImagefsError, StoreError, StoreUnavailable,
                            errno_name)

log = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_PENDING_WRITES = 8  # chunks waiting for the LMDB writer; bounds their memory
_TABLE_CACHE = 128 << 20  # block tables kept in memory: 1 TiB of images at 256 KiB blocks
_FETCH_ATTEMPTS = 2  # a chunk that fails its hashes is fetched once more (a flipped bit)
# A chunk the store just failed to deliver fails again at once for this long: the kernel
# retries a failed readahead with a synchronous read, which must not wait a second deadline.
_FAILURE_MEMORY = 2.0
# LMDB ranges up to this size are read on the event loop: a thread hop costs more than
# the copy and its checksum (warm 4K O_DIRECT: 2.9k -> 5.3k IOPS at 1 job, 2.8k -> 7.3k at
# 4; docs/benchmarks.md). The price: a page fault on the map stalls the loop for one
# small disk read. Larger ranges, and whole chunks, go to a worker thread.
_INLINE_READ = 128 << 10
_STORE_SHARE = 0.9  # of read_timeout: a stalled fetch gives up just before the read does


@dataclass
class ReadStats:
    """Counters of the read path. A memory miss looks in LMDB; an LMDB miss (or a
    damaged entry, which the cache counts) fetches the chunk from the store."""

    reads: int = 0  # requests answered; read_bytes / reads is the kernel's request size
    read_bytes: int = 0  # returned to readers; with store_bytes, the hit ratio by bytes
    store_requests: int = 0
    store_bytes: int = 0
    lmdb_hits: int = 0
    lmdb_misses: int = 0
    memory_hits: int = 0
    memory_misses: int = 0
    corrupt_chunks: int = 0
    read_timeouts: int = 0
    # By errno name; EIO (what store trouble answers) is there from the start, at 0.
    read_errors: dict[str, int] = field(default_factory=lambda: {"EIO": 0})

    def as_dict(self) -> dict[str, int | dict[str, int]]:
        return {**self.__dict__, "read_errors": dict(self.read_errors)}


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


class _ByteLRU:
    """A byte-bounded LRU: verified chunks (hot data is not re-checked), block tables."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def discard_if(self, doomed: Callable[[Hashable], bool]) -> None:
        for key in [k for k in self._items if doomed(k)]:
            self._bytes -= len(self._items.pop(key))

    def put(self, key: Hashable, data: bytes) -> None:
        if key in self._items or len(data) > self.capacity:
            return
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self.capacity:
            _key, old = self._items.popitem(last=False)
            self._bytes -= len(old)


class _Geometry:
    """Where block `b` of an image lives: its chunk, its place in the chunk, its size."""

    def __init__(self, manifest: mf.Manifest, chunk_size: int) -> None:
        self.manifest = manifest
        self.size = manifest.record.size or 0
        self.block = manifest.block_size
        self.chunk = max(self.block, chunk_size // self.block * self.block)
        self.blocks_per_chunk = self.chunk // self.block
        self._prefix = image_prefix(manifest.record.id, manifest.record.os_hash_value or "")

    def key(self, chunk: int) -> bytes:
        return self._prefix + chunk_suffix(self.chunk, chunk)

    def chunk_length(self, chunk: int) -> int:
        return min(self.chunk, self.size - chunk * self.chunk)

    def block_range(self, block: int) -> tuple[int, int]:
        """(offset inside its chunk, length) of a block."""
        start = (block % self.blocks_per_chunk) * self.block
        return start, min(self.block, self.size - block * self.block)

    def blocks_of(self, chunk: int) -> range:
        first = chunk * self.blocks_per_chunk
        return range(first, min(first + self.blocks_per_chunk, -(-self.size // self.block)))


def _block_ok(table: bytes, block: int, data: bytes | memoryview) -> bool:
    return hashlib.sha256(data).digest() == \
        table[block * mf.DIGEST_SIZE:(block + 1) * mf.DIGEST_SIZE]


class ImageReader:
    def __init__(self, catalog_store: CatalogStore, index: CatalogIndex, cache: ChunkCache,
                 chunk_size: int, memory_cache: int, prefetch_max: int,
                 store_limit: int = 16, read_timeout: float = 10.0) -> None:
        self.catalog_store = catalog_store
        self.index = index
        self.cache = cache
        self.chunk_size = chunk_size
        self.prefetch_max = prefetch_max
        self.read_timeout = read_timeout
        self.stats = ReadStats()
        # Registered by the daemon's metrics (metrics.py), if it serves them.
        self.fetch_seconds = Histogram("imagefs_store_fetch_seconds", "Time a chunk fetch "
                                       "from the store took, failed ones included",
                                       registry=None)
        self.store_calls = BlockingCalls(store_limit)
        self._memory = _ByteLRU(memory_cache)
        self._tables = _ByteLRU(_TABLE_CACHE)
        self._table_locks: dict[str, trio.Lock] = {}
        self._flights: dict[object, _Flight] = {}
        self._failures: dict[bytes, tuple[float, ImagefsError]] = {}
        self._cpu_limiter = trio.CapacityLimiter(2)
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

    def geometry(self, manifest: mf.Manifest) -> _Geometry:
        return _Geometry(manifest, self.chunk_size)

    # -- what cache control asks (pinning.py) -------------------------------------------

    async def cache_chunk(self, geo: _Geometry, chunk: int) -> None:
        """Load one chunk the way a read would, so that it is written to the cache."""
        await self._single_flight(geo.key(chunk), self._load_chunk, geo, chunk)

    def forget(self, prefix: bytes) -> None:
        """Drop an image's verified chunks from memory (they left the cache)."""
        self._memory.discard_if(lambda key: key.startswith(prefix))  # type: ignore[attr-defined]

    async def write_cache(self, fn: Callable[..., T], *args: object) -> T:
        """A blocking cache write, in the one slot LMDB writes share."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._lmdb_write_limiter)

    # -- the read path ------------------------------------------------------------------

    async def read(self, geo: _Geometry, offset: int, size: int,
                   stream: Stream | None = None) -> bytes | memoryview:
        """Verified bytes, or StoreUnavailable once `read_timeout` has passed.

        A read inside one chunk that memory or LMDB holds is answered at once, without
        the deadline's cancel scope (which cost 14 % of a cached 4 KiB read).
        """
        end = min(offset + size, geo.size)
        if offset >= end:
            return b""
        chunk = offset // geo.chunk
        looked = (end - 1) // geo.chunk == chunk
        if looked:
            base = chunk * geo.chunk
            data = self._cached_range(geo, chunk, offset - base, end - base)
            if data is not None:
                return self._served(geo, stream, offset, end, data)
        try:
            with trio.move_on_after(self.read_timeout):
                return self._served(geo, stream, offset, end,
                                    await self._read(geo, offset, end, looked))
            self.stats.read_timeouts += 1
            log.warning("read of image %s at %d answered EIO: the store did not deliver "
                        "within %gs", geo.manifest.record.id, offset, self.read_timeout)
            raise StoreUnavailable(f"image {geo.manifest.record.id}: no data from the store "
                                   f"within {self.read_timeout:g}s")
        except Exception as exc:
            name = errno_name(exc)
            self.stats.read_errors[name] = self.stats.read_errors.get(name, 0) + 1
            raise

    def _served(self, geo: _Geometry, stream: Stream | None, offset: int, end: int,
                data: bytes | memoryview) -> bytes | memoryview:
        self.stats.reads += 1
        self.stats.read_bytes += len(data)
        if stream is not None:
            self._after_read(geo, stream, offset, end)
        return data

    async def _read(self, geo: _Geometry, offset: int, end: int,
                    looked: bool) -> bytes | memoryview:
        """`looked`: read() found the (one) chunk in neither memory nor LMDB already."""
        parts = []
        at = offset
        while at < end:
            chunk = at // geo.chunk
            base = chunk * geo.chunk
            stop = min(end, base + geo.chunk_length(chunk))
            parts.append(await self._chunk_range(geo, chunk, at - base, stop - base, looked))
            at = stop
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _cached_range(self, geo: _Geometry, chunk: int, start: int,
                      stop: int) -> bytes | memoryview | None:
        """Bytes [start, stop) of a chunk without waiting: a view of it in memory, or a
        small range out of LMDB (its pages checked); None otherwise. Counts hits only."""
        key = geo.key(chunk)
        data = self._memory.get(key)
        if data is not None:
            self.stats.memory_hits += 1
            self.cache.touch(key)
            return memoryview(data)[start:stop]
        if stop - start <= _INLINE_READ and key not in self._flights:
            cached = self.cache.get_range(key, start, stop - start)
            if cached is not None:
                self.stats.lmdb_hits += 1
                return cached
        return None

    async def _chunk_range(self, geo: _Geometry, chunk: int, start: int, stop: int,
                           looked: bool) -> bytes | memoryview:
        """Bytes [start, stop) of one chunk: memory, else the range out of LMDB (its
        pages checked), else the whole chunk from the store."""
        data = None if looked else self._cached_range(geo, chunk, start, stop)
        if data is not None:
            return data
        self.stats.memory_misses += 1
        key = geo.key(chunk)
        if stop - start > _INLINE_READ and key not in self._flights:  # a fetch under way
            cached = await trio.to_thread.run_sync(  # is waited for, not raced
                self.cache.get_range, key, start, stop - start, limiter=self._cpu_limiter)
            if cached is not None:
                self.stats.lmdb_hits += 1
                return cached
        data = await self._single_flight(key, self._load_chunk, geo, chunk)
        return memoryview(data)[start:stop]

    async def _single_flight(self, key: object, load, *args) -> bytes:  # type: ignore[no-untyped-def]
        """Run `load(*args)` once for concurrent callers asking for the same `key`."""
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.data is not None:
                return flight.data
            if flight.error is not None:  # else the loader was cancelled: try ourselves
                raise flight.error
        flight = self._flights[key] = _Flight()
        try:
            flight.data = await load(*args)
            return flight.data
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    async def _load_chunk(self, geo: _Geometry, chunk: int) -> bytes:
        """A whole verified chunk, kept in memory: LMDB in one hop, else the store."""
        key = geo.key(chunk)
        cached = await trio.to_thread.run_sync(self.cache.get, key, limiter=self._cpu_limiter)
        if cached is not None:
            self.stats.lmdb_hits += 1
            self._memory.put(key, cached)
            return cached
        self.stats.lmdb_misses += 1
        return await self._fetch_chunk(geo, chunk, await self.block_table(geo.manifest))

    async def _fetch_chunk(self, geo: _Geometry, chunk: int, table: bytes) -> bytes:
        """A whole chunk from the store, verified block by block, then cached.

        A chunk that fails its hashes is fetched once more (bits flipped on the way);
        failing again, the store's copy is corrupt and the read answers EIO.
        """
        key = geo.key(chunk)
        failed = self._failures.get(key)
        if failed is not None and trio.current_time() - failed[0] < _FAILURE_MEMORY:
            raise failed[1]
        try:
            data = await self._fetch_verified(geo, chunk, table)
        except (StoreError, ChunkCorrupted) as exc:
            now = trio.current_time()
            self._failures = {k: v for k, v in self._failures.items()
                              if now - v[0] < _FAILURE_MEMORY}
            self._failures[key] = (now, exc)
            raise
        self._failures.pop(key, None)
        self._memory.put(key, data)
        self._pending_writes += 1
        if self._pending_writes <= _MAX_PENDING_WRITES and self._nursery is not None:
            self._nursery.start_soon(self._write_back, key, data)
        else:  # the cache is slower than the store: let the reader wait (backpressure)
            await self._write_back(key, data)
        return data

    async def _fetch_verified(self, geo: _Geometry, chunk: int, table: bytes) -> bytes:
        image_id = geo.manifest.record.id
        for attempt in range(_FETCH_ATTEMPTS):
            with self.fetch_seconds.time():
                data = await self.store_calls.run(
                    self.catalog_store.store.get_range, mf.data_key(image_id),
                    chunk * geo.chunk, geo.chunk_length(chunk),
                    timeout=self.read_timeout * _STORE_SHARE,
                    what=f"chunk {chunk} of image {image_id}")
            self.stats.store_requests += 1
            self.stats.store_bytes += len(data)
            bad = await trio.to_thread.run_sync(self._first_bad_block, geo, chunk, table,
                                                data, limiter=self._cpu_limiter)
            if bad is None:
                break
            self.stats.corrupt_chunks += 1
            if attempt + 1 < _FETCH_ATTEMPTS:
                log.warning("image %s: block %d from the store does not match its hash; "
                            "fetching it again", image_id, bad)
                continue
            log.error("image %s: block %d does not match the hash recorded at upload, twice; "
                      "the store's copy is corrupt (read answered EIO)", image_id, bad)
            raise ChunkCorrupted(f"image {image_id}: block {bad} is corrupt")
        return data

    @staticmethod
    def _first_bad_block(geo: _Geometry, chunk: int, table: bytes, data: bytes) -> int | None:
        if len(data) != geo.chunk_length(chunk):
            return geo.blocks_of(chunk).start
        view = memoryview(data)
        for block in geo.blocks_of(chunk):
            start, length = geo.block_range(block)
            if not _block_ok(table, block, view[start:start + length]):
                return block
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
        key = (manifest.record.id, manifest.blocks_sha256)
        table = self._tables.get(key)
        if table is not None:
            return table
        lock = self._table_locks.setdefault(manifest.record.id, trio.Lock())
        try:
            async with lock:
                table = self._tables.get(key)
                if table is None:
                    table = await trio.to_thread.run_sync(self.index.block_table, manifest)
                    if table is None:
                        table = await self.store_calls.run(
                            self.catalog_store.block_table, manifest,
                            timeout=self.read_timeout * _STORE_SHARE,
                            what=f"block table of image {manifest.record.id}")
                        await trio.to_thread.run_sync(self.index.put_block_table, manifest,
                                                      table, limiter=self._lmdb_write_limiter)
                    self._tables.put(key, table)
        finally:
            self._table_locks.pop(manifest.record.id, None)  # later callers hit _tables
        return table

    # -- prefetch -----------------------------------------------------------------------

    def _after_read(self, geo: _Geometry, stream: Stream, offset: int, end: int) -> None:
        """Prefetch ahead of a sequential reader as far as it has read sequentially.

        The window grows with the run (a 1 MiB read prefetches about 1 MiB, a backup
        reading gigabytes prefetches `prefetch_max`), and a seek resets it.
        """
        sequential = offset == stream.next_offset
        if sequential:
            stream.run += end - offset
        else:
            stream.run = end - offset
            stream.prefetched_to = 0
        stream.next_offset = end
        if self._nursery is None or not sequential:  # random readers get exactly what they ask
            return
        target = min(end + min(stream.run, self.prefetch_max), geo.size)
        first = max(-(-stream.prefetched_to // geo.chunk), end // geo.chunk)
        last = -(-target // geo.chunk)  # chunks [first, last) are new to this stream
        for chunk in range(first, last):
            self._nursery.start_soon(self._prefetch, geo, chunk)
        stream.prefetched_to = max(stream.prefetched_to, last * geo.chunk)

    async def _prefetch(self, geo: _Geometry, chunk: int) -> None:
        key = geo.key(chunk)
        if key in self._flights or key in self._memory:
            return
        async with self._prefetch_slots:
            try:
                await self._single_flight(key, self._load_chunk, geo, chunk)
            except ImagefsError as exc:
                log.debug("prefetch of chunk %d of %s failed: %s", chunk,
                          geo.manifest.record.id, exc)
            except Exception:
                log.exception("prefetch of chunk %d of %s failed", chunk,
                              geo.manifest.record.id)
