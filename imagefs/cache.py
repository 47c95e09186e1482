"""The local LMDB cache: data chunks under a hard size cap with LRU eviction.

One environment per cache dir (py-lmdb's rule: one Environment per path per process).
Named databases:
  chunks  chunk key -> header + data      header = magic, length
  cmeta   chunk key -> last-use sequence number + size
  lru     sequence number + chunk key -> ''   (oldest first: the eviction order)
  meta    bookkeeping (total cached bytes, next sequence number)
  pins    image id -> prefix, size, time      (pinned: never evicted; pinning.py)
Other modules (the catalog index) open their own named databases in the same env.

Every method blocks; the daemon calls them from worker threads, writes under a
capacity limiter of one. A damaged entry is a miss, never an error: the header catches
truncation, and the reader checks every block it takes against the image's sha256
block table, so there is no checksum of the whole value (a 4 KiB read would pay for it).
"""

from __future__ import annotations

import logging
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import NamedTuple

import lmdb

log = logging.getLogger(__name__)

_MAGIC = b"IFC2"
_HEADER = struct.Struct(">4sI")
_SEQ = struct.Struct(">Q")
_CMETA = struct.Struct(">QQ")
LOW_WATER = 0.9  # evict down to this fraction of the room (of the cap less pins)
PINS_DB = b"pins"  # dropped with the catalog when the cache dir changes store (catalog_index)
_PIN = struct.Struct(">24sQQ")  # image prefix, image size, when pinned (µs since 1970)
PREFIX = 24  # bytes of a chunk key that name the image's data: uuid + sha512 prefix
_CATALOG_ALLOWANCE = 2 << 30


def open_environment(path: Path, cache_size: int) -> lmdb.Environment:
    """Open (or recreate, if damaged) the cache's LMDB environment.

    The cache is disposable: the store is the truth, so a damaged environment is
    wiped and started again rather than failing the mount.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "lmdb").mkdir(mode=0o700, exist_ok=True)
    (path / "lmdb").chmod(0o700)  # cached data of every tenant: the daemon's alone
    map_size = cache_size + max(cache_size // 4, 256 << 20) + _CATALOG_ALLOWANCE
    # readahead stays on: a chunk is a run of contiguous overflow pages, read whole.
    kwargs = dict(map_size=map_size, max_dbs=16, subdir=True, readahead=True,
                  sync=False, metasync=False, max_readers=512, lock=True, mode=0o600)
    try:
        return lmdb.open(str(path / "lmdb"), **kwargs)
    except lmdb.Error as exc:
        log.error("cache at %s is damaged (%s); starting with an empty cache", path, exc)
        shutil.rmtree(path / "lmdb", ignore_errors=True)
        (path / "lmdb").mkdir(mode=0o700)
        return lmdb.open(str(path / "lmdb"), **kwargs)


def image_prefix(image_id: str, os_hash_value: str) -> bytes:
    """What every chunk key of one image's data starts with: its identity and checksum."""
    return bytes.fromhex(image_id.replace("-", "")) + bytes.fromhex(os_hash_value[:16])


def chunk_key(image_id: str, os_hash_value: str, chunk_size: int, index: int) -> bytes:
    """Identity and checksum of the image, the chunk geometry, and the chunk number."""
    return image_prefix(image_id, os_hash_value) + struct.pack(">IQ", chunk_size, index)


class _NoRoom(Exception):
    """Everything the cap holds is pinned: the chunk stays uncached."""


class Pin(NamedTuple):
    prefix: bytes  # of the image's chunk keys (image_prefix)
    size: int
    since_us: int


class ChunkCache:
    def __init__(self, env: lmdb.Environment, cap: int) -> None:
        self.env = env
        self.cap = cap
        self._chunks = env.open_db(b"chunks")
        self._cmeta = env.open_db(b"cmeta")
        self._lru = env.open_db(b"lru")
        self._meta = env.open_db(b"meta")
        self._pins = env.open_db(PINS_DB)
        self._touched: set[bytes] = set()
        self._touched_lock = threading.Lock()
        self.evicted_bytes = 0
        self._full = False  # of pinned chunks, and said so: once, not once a chunk
        self.evictions = 0  # chunks evicted to stay under the cap

    # -- reads --------------------------------------------------------------------------

    def get_range(self, key: bytes, start: int, length: int) -> bytes | None:
        """`length` bytes at `start` of a cached chunk, or None (a miss).

        Copies only the range out of the memory map. A damaged header is reported,
        dropped, and a miss.
        """
        return self._read(key, start, length)

    def get(self, key: bytes) -> bytes | None:
        """A whole cached chunk, or None."""
        return self._read(key, 0, None)

    def _read(self, key: bytes, start: int, length: int | None) -> bytes | None:
        try:
            with self.env.begin(db=self._chunks, buffers=True) as txn:
                raw = txn.get(key)
                if raw is None:
                    return None
                if len(raw) >= _HEADER.size:
                    magic, stored = _HEADER.unpack_from(raw)
                    end = stored if length is None else start + length
                    if magic == _MAGIC and stored == len(raw) - _HEADER.size and end <= stored:
                        data = bytes(raw[_HEADER.size + start:_HEADER.size + end])
                        with self._touched_lock:
                            self._touched.add(key)
                        return data
            log.error("cache entry %s is damaged; it will be refetched", key.hex())
            self.discard(key)
        except lmdb.Error as exc:  # a damaged page: the store still has the data
            log.error("cache read of %s failed (%s); fetching from the store", key.hex(), exc)
        return None

    def total_bytes(self) -> int:
        with self.env.begin(db=self._meta) as txn:
            return self._read_counter(txn, b"total")

    def entry_count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self._chunks)["entries"]

    def chunks(self, prefix: bytes) -> dict[bytes, int]:
        """The cached chunks whose keys start with `prefix` (one image's), and their sizes."""
        found = {}
        with self.env.begin(db=self._cmeta) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, meta in cursor:
                    if not key.startswith(prefix):
                        break
                    found[bytes(key)] = _CMETA.unpack(meta)[1]
        return found

    def usage(self) -> dict[bytes, int]:
        """Cached bytes per image prefix: what `imagefs cache status` lists."""
        used: dict[bytes, int] = {}
        with self.env.begin(db=self._cmeta) as txn:
            for key, meta in txn.cursor():
                prefix = bytes(key[:PREFIX])
                used[prefix] = used.get(prefix, 0) + _CMETA.unpack(meta)[1]
        return used

    # -- writes -------------------------------------------------------------------------

    def put(self, key: bytes, data: bytes) -> None:
        """Cache one chunk, evicting the least recently used ones to stay under the cap."""
        if len(data) > self.cap:
            return
        value = _HEADER.pack(_MAGIC, len(data)) + data
        try:
            self._put(key, value, len(data))
        except lmdb.MapFullError:
            log.warning("cache file is full; evicting harder")
            with self.env.begin(write=True) as txn:
                evicted = self._evict(txn, self.cap // 2)
            self.evicted_bytes += evicted
            self._put(key, value, len(data))

    def _put(self, key: bytes, value: bytes, size: int) -> None:
        try:
            evicted = self._insert(key, value, size)
        except _NoRoom:
            if not self._full:
                log.warning("the cache is full of pinned chunks (cap %d bytes): other chunks "
                            "stay uncached until images are unpinned", self.cap)
            self._full = True
            return
        self._full = False
        self.evicted_bytes += evicted

    def _insert(self, key: bytes, value: bytes, size: int) -> int:
        """One write: the chunk in, LRU chunks out past the cap; the bytes evicted."""
        evicted = 0
        with self.env.begin(write=True) as txn:
            total = self._read_counter(txn, b"total")
            old = txn.get(key, db=self._cmeta)
            if old is not None:
                old_seq, old_size = _CMETA.unpack(old)
                txn.delete(_SEQ.pack(old_seq) + key, db=self._lru)
                total -= old_size
            seq = self._next_seq(txn)
            txn.put(key, value, db=self._chunks)
            txn.put(key, _CMETA.pack(seq, size), db=self._cmeta)
            txn.put(_SEQ.pack(seq) + key, b"", db=self._lru)
            total += size
            txn.put(b"total", _SEQ.pack(total), db=self._meta)
            if total > self.cap:
                evicted = self._evict(txn, self._low_water(txn))
                if self._read_counter(txn, b"total") > self.cap:
                    raise _NoRoom  # aborts the transaction: nothing changed
        return evicted

    def _low_water(self, txn: lmdb.Transaction) -> int:
        """What eviction goes down to: a tenth of the room pins leave is freed at a time
        (without pins, 90 % of the cap), so eviction runs in batches."""
        pinned = sum(pin.size for pin in self._pinned(txn).values())
        return self.cap - int(max(self.cap - pinned, 0) * (1 - LOW_WATER))

    def discard(self, key: bytes) -> None:
        with self.env.begin(write=True) as txn:
            self._remove(txn, key)

    def flush_touches(self) -> None:
        """Move recently read chunks to the young end of the LRU order, in one write.

        Reads only note the key; doing the write per read would serialise all readers
        behind LMDB's single writer.
        """
        with self._touched_lock:
            touched, self._touched = self._touched, set()
        if not touched:
            return
        with self.env.begin(write=True) as txn:
            for key in touched:
                old = txn.get(key, db=self._cmeta)
                if old is None:
                    continue
                old_seq, size = _CMETA.unpack(old)
                seq = self._next_seq(txn)
                txn.delete(_SEQ.pack(old_seq) + key, db=self._lru)
                txn.put(_SEQ.pack(seq) + key, b"", db=self._lru)
                txn.put(key, _CMETA.pack(seq, size), db=self._cmeta)

    def _evict(self, txn: lmdb.Transaction, target: int) -> int:
        """Remove least recently used chunks, never pinned ones, down to `target` bytes;
        the bytes removed."""
        total = self._read_counter(txn, b"total")
        pinned = {pin.prefix for pin in self._pinned(txn).values()}
        cursor = txn.cursor(db=self._lru)
        victims = []
        if cursor.first():
            for lru_key in cursor.iternext(values=False):
                if total <= target:
                    break
                key = bytes(lru_key[_SEQ.size:])
                if key[:PREFIX] in pinned:
                    continue
                meta = txn.get(key, db=self._cmeta)
                total -= _CMETA.unpack(meta)[1] if meta else 0
                victims.append(key)
        self.evictions += len(victims)
        return sum(self._remove(txn, key) for key in victims)

    def discard_all(self, keys: list[bytes]) -> int:
        """Drop chunks now (`imagefs cache drop`); the bytes freed."""
        with self.env.begin(write=True) as txn:
            return sum(self._remove(txn, key) for key in keys)

    # -- pins ---------------------------------------------------------------------------

    def pin(self, image_id: str, prefix: bytes, size: int) -> None:
        """Keep the chunks under `prefix` out of eviction from now on, across restarts."""
        with self.env.begin(write=True, db=self._pins) as txn:
            txn.put(image_id.encode(), _PIN.pack(prefix, size, time.time_ns() // 1000))

    def unpin(self, image_id: str) -> bool:
        """Make an image's chunks evictable again; False if it was not pinned."""
        with self.env.begin(write=True, db=self._pins) as txn:
            return txn.delete(image_id.encode())

    def pins(self) -> dict[str, Pin]:
        """Pinned image id -> its pin."""
        with self.env.begin() as txn:
            return self._pinned(txn)

    def _pinned(self, txn: lmdb.Transaction) -> dict[str, Pin]:
        pins = {}
        for key, value in txn.cursor(db=self._pins):
            if len(value) == _PIN.size:  # a damaged row pins nothing
                pins[bytes(key).decode(errors="replace")] = Pin(*_PIN.unpack(value))
        return pins

    def _remove(self, txn: lmdb.Transaction, key: bytes) -> int:
        meta = txn.get(key, db=self._cmeta)
        txn.delete(key, db=self._chunks)
        if meta is None:
            return 0
        seq, size = _CMETA.unpack(meta)
        txn.delete(key, db=self._cmeta)
        txn.delete(_SEQ.pack(seq) + key, db=self._lru)
        total = self._read_counter(txn, b"total") - size
        txn.put(b"total", _SEQ.pack(max(total, 0)), db=self._meta)
        return size

    def _next_seq(self, txn: lmdb.Transaction) -> int:
        seq = self._read_counter(txn, b"seq") + 1
        txn.put(b"seq", _SEQ.pack(seq), db=self._meta)
        return seq

    def _read_counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        raw = txn.get(name, db=self._meta)
        return _SEQ.unpack(raw)[0] if raw else 0
