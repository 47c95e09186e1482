"""The local LMDB cache: data chunks under a hard size cap, scan-resistant eviction.

One environment per cache dir (py-lmdb's rule: one Environment per path per process).
Named databases:
  chunks  chunk key -> the chunk's bytes, as fetched and verified
  sums    chunk key -> an xxh3-64 digest of every 4 KiB page of the chunk
  cmeta   chunk key -> segment, last-use sequence number, size, when it entered it
  lru     segment + sequence number + chunk key -> ''   (oldest first per segment)
  meta    bookkeeping (layout, total and protected bytes, next sequence number)
  pins    image id -> prefix, size, time      (pinned: never evicted; pinning.py)
Other modules (the catalog index) open their own named databases in the same env.

Every chunk is verified against the image's sha256 block table once, when it comes
from the store; the page digests are computed from those verified bytes as the chunk is
written, and checked on every read of the pages a read touches (mountpoint-s3 protects
its cache blocks the same way). A 4 KiB read so checks 4 KiB at ~12 GB/s instead of
hashing a 256 KiB block with sha256. Any mismatch, a torn value or a missing digest
makes the entry a miss that is dropped and refetched, never data.

Eviction is a segmented LRU (2Q-like), so one pass of a backup tool does not flush what
hypervisors boot from: a chunk enters *probation*; read again at least `reuse_gap`
seconds after it came in, it is *protected*. Eviction takes probation's oldest first; protected
chunks past `PROTECTED_SHARE` of the cap fall back to probation's young end. Re-reads
inside the gap (the many FUSE reads of one chunk in one pass) do not count as reuse.

Every method blocks; the daemon calls them from worker threads, writes under a
capacity limiter of one.
"""

from __future__ import annotations

import logging
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import lmdb
import xxhash

log = logging.getLogger(__name__)

LAYOUT = b"3"  # of the cache's values; an older one is dropped at open (data is refetched)
PAGE = 4096  # what one digest of the cache's own checksums covers
_DIGEST = 8  # bytes of an xxh3-64 digest
_SEQ = struct.Struct(">Q")
_CHUNK_NO = struct.Struct(">IQ")  # chunk size, chunk number: the end of a chunk key
_CMETA = struct.Struct(">BQQQ")  # segment, sequence number, size, since (µs since 1970)
PROBATION, PROTECTED = 0, 1
PROTECTED_SHARE = 0.8  # of the room pins leave: at most this much is protected
REUSE_GAP = 10.0  # default seconds between a chunk's arrival and a read that counts as reuse
LOW_WATER = 0.9  # evict down to this fraction of the room (of the cap less pins)
PINS_DB = b"pins"  # dropped with the catalog when the cache dir changes store (catalog_index)
_PIN = struct.Struct(">24sQQ")  # image prefix, image size, when pinned (µs since 1970)
PREFIX = 24  # bytes of a chunk key that name the image's data: uuid + sha512 prefix
_CATALOG_ALLOWANCE = 2 << 30


def page_digests(data: bytes | memoryview, first: int = 0, last: int | None = None) -> bytes:
    """The xxh3-64 digests of pages [first, last) of `data`, concatenated."""
    view = memoryview(data)
    stop = len(view) if last is None else min(last * PAGE, len(view))
    return b"".join([xxhash.xxh3_64_digest(view[at:at + PAGE])
                     for at in range(first * PAGE, stop, PAGE)])


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
    return image_prefix(image_id, os_hash_value) + chunk_suffix(chunk_size, index)


def chunk_suffix(chunk_size: int, index: int) -> bytes:
    """What follows the image prefix in a chunk key (readers keep the prefix)."""
    return _CHUNK_NO.pack(chunk_size, index)


class _NoRoom(Exception):
    """Everything the cap holds is pinned: the chunk stays uncached."""


class Pin(NamedTuple):
    prefix: bytes  # of the image's chunk keys (image_prefix)
    size: int
    since_us: int


class _Entry(NamedTuple):
    segment: int
    seq: int
    size: int
    since_us: int

    def lru_key(self, key: bytes) -> bytes:
        return bytes([self.segment]) + _SEQ.pack(self.seq) + key


class ChunkCache:
    def __init__(self, env: lmdb.Environment, cap: int,
                 clock: Callable[[], float] = time.time, reuse_gap: float = REUSE_GAP) -> None:
        self.env = env
        self.cap = cap
        self.reuse_gap = reuse_gap
        self.clock = clock  # wall time: a chunk's arrival outlives the daemon
        self._chunks = env.open_db(b"chunks")
        self._sums = env.open_db(b"sums")
        self._cmeta = env.open_db(b"cmeta")
        self._lru = env.open_db(b"lru")
        self._meta = env.open_db(b"meta")
        self._pins = env.open_db(PINS_DB)
        self._touched: dict[bytes, float] = {}  # chunk key -> when it was last read
        self._touched_lock = threading.Lock()
        self.evicted_bytes = 0
        self._full = False  # of pinned chunks, and said so: once, not once a chunk
        self.evictions = {"probation": 0, "protected": 0}  # chunks evicted, by segment
        self.damaged = 0  # entries that failed their page digests (dropped, refetched)
        self._adopt_layout()

    def _adopt_layout(self) -> None:
        """Drop the chunks of an older value layout: they are refetched, nothing is lost."""
        with self.env.begin(write=True) as txn:
            if txn.get(b"layout", db=self._meta) == LAYOUT:
                return
            stale = txn.stat(self._chunks)["entries"]
            for db in (self._chunks, self._sums, self._cmeta, self._lru, self._meta):
                txn.drop(db, delete=False)
            txn.put(b"layout", LAYOUT, db=self._meta)
        if stale:
            log.info("the cache holds %d chunks of an older layout; they were dropped and "
                     "will be fetched again", stale)

    # -- reads --------------------------------------------------------------------------

    def get_range(self, key: bytes, start: int, length: int) -> bytes | None:
        """`length` bytes at `start` of a cached chunk, or None (a miss).

        Copies only the range out of the memory map, and checks only the pages it
        touches. A damaged entry is reported, dropped, and a miss.
        """
        return self._read(key, start, length)

    def get(self, key: bytes) -> bytes | None:
        """A whole cached chunk, every page checked, or None."""
        return self._read(key, 0, None)

    def _read(self, key: bytes, start: int, length: int | None) -> bytes | None:
        try:
            with self.env.begin(buffers=True) as txn:
                raw = txn.get(key, db=self._chunks)
                if raw is None:
                    return None
                sums = txn.get(key, db=self._sums)
                end = len(raw) if length is None else start + length
                first, last = start // PAGE, -(-end // PAGE)
                if sums is not None and len(sums) == -(-len(raw) // PAGE) * _DIGEST \
                        and end <= len(raw) and page_digests(raw, first, last) == \
                        sums[first * _DIGEST:last * _DIGEST]:
                    data = bytes(raw[start:end])
                    self.touch(key)
                    return data
            log.error("cache entry %s failed its page checksums; it is dropped and will "
                      "be fetched from the store", key.hex())
            self.damaged += 1
            self.discard(key)
        except lmdb.Error as exc:  # a damaged page: the store still has the data
            log.error("cache read of %s failed (%s); fetching from the store", key.hex(), exc)
        return None

    def touch(self, key: bytes) -> None:
        """Note a read of a chunk (the reader's memory hits count too); flush_touches
        writes them down."""
        now = self.clock()
        with self._touched_lock:
            self._touched[key] = now

    def total_bytes(self) -> int:
        with self.env.begin(db=self._meta) as txn:
            return self._read_counter(txn, b"total")

    def protected_bytes(self) -> int:
        with self.env.begin(db=self._meta) as txn:
            return self._read_counter(txn, b"protected")

    def entry_count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self._chunks)["entries"]

    def segment_of(self, key: bytes) -> int | None:
        """PROBATION, PROTECTED, or None when the chunk is not cached."""
        with self.env.begin(db=self._cmeta) as txn:
            entry = self._entry(txn, key)
        return None if entry is None else entry.segment

    def chunks(self, prefix: bytes) -> dict[bytes, int]:
        """The cached chunks whose keys start with `prefix` (one image's), and their sizes."""
        found = {}
        with self.env.begin(db=self._cmeta) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, meta in cursor:
                    if not key.startswith(prefix):
                        break
                    found[bytes(key)] = _Entry(*_CMETA.unpack(meta)).size
        return found

    def usage(self) -> dict[bytes, int]:
        """Cached bytes per image prefix: what `imagefs cache status` lists."""
        used: dict[bytes, int] = {}
        with self.env.begin(db=self._cmeta) as txn:
            for key, meta in txn.cursor():
                prefix = bytes(key[:PREFIX])
                used[prefix] = used.get(prefix, 0) + _Entry(*_CMETA.unpack(meta)).size
        return used

    def audit(self) -> list[str]:
        """What is inconsistent in the bookkeeping (empty when all is well): for tests
        and `imagefs doctor`, never on the read path."""
        problems = []
        with self.env.begin() as txn:
            entries = {bytes(k): _Entry(*_CMETA.unpack(v))
                       for k, v in txn.cursor(db=self._cmeta)}
            sizes = {bytes(k): len(v) for k, v in txn.cursor(db=self._chunks)}
            sums = {bytes(k): len(v) for k, v in txn.cursor(db=self._sums)}
            lru = {bytes(k) for k in txn.cursor(db=self._lru).iternext(values=False)}
            total = self._read_counter(txn, b"total")
            protected = self._read_counter(txn, b"protected")
        if set(sizes) != set(entries) or set(sums) != set(entries):
            problems.append("chunks, digests and bookkeeping hold different keys")
        if lru != {entry.lru_key(key) for key, entry in entries.items()}:
            problems.append("the eviction order does not match the chunks")
        for key, entry in entries.items():
            if sizes.get(key) != entry.size or sums.get(key) != -(-entry.size // PAGE) * _DIGEST:
                problems.append(f"chunk {key.hex()} does not match its recorded size")
        if total != sum(e.size for e in entries.values()):
            problems.append(f"total {total} is not the sum of the chunks")
        if protected != sum(e.size for e in entries.values() if e.segment == PROTECTED):
            problems.append(f"protected total {protected} is not the sum of its chunks")
        if total > self.cap:
            problems.append(f"total {total} is over the cap {self.cap}")
        return problems

    # -- writes -------------------------------------------------------------------------

    def put(self, key: bytes, data: bytes) -> None:
        """Cache one verified chunk on probation, evicting to stay under the cap."""
        if len(data) > self.cap:
            return
        sums = page_digests(data)
        try:
            self._put(key, data, sums)
        except lmdb.MapFullError:
            log.warning("cache file is full; evicting harder")
            with self.env.begin(write=True) as txn:
                evicted = self._evict(txn, self.cap // 2)
            self.evicted_bytes += evicted
            self._put(key, data, sums)

    def _put(self, key: bytes, data: bytes, sums: bytes) -> None:
        try:
            evicted = self._insert(key, data, sums)
        except _NoRoom:
            if not self._full:
                log.warning("the cache is full of pinned chunks (cap %d bytes): other chunks "
                            "stay uncached until images are unpinned", self.cap)
            self._full = True
            return
        self._full = False
        self.evicted_bytes += evicted

    def _insert(self, key: bytes, data: bytes, sums: bytes) -> int:
        """One write: the chunk in, old chunks out past the cap; the bytes evicted."""
        evicted = 0
        with self.env.begin(write=True) as txn:
            self._unlink(txn, key)
            txn.put(key, data, db=self._chunks)
            txn.put(key, sums, db=self._sums)
            self._link(txn, key, PROBATION, len(data), self._now_us())
            if self._read_counter(txn, b"total") > self.cap:
                evicted = self._evict(txn, self._low_water(txn))
                if self._read_counter(txn, b"total") > self.cap:
                    raise _NoRoom  # aborts the transaction: nothing changed
        return evicted

    def _low_water(self, txn: lmdb.Transaction) -> int:
        """What eviction goes down to: a tenth of the room pins leave is freed at a time
        (without pins, 90 % of the cap), so eviction runs in batches."""
        return self.cap - int(self._room(txn) * (1 - LOW_WATER))

    def _room(self, txn: lmdb.Transaction) -> int:
        pinned = sum(pin.size for pin in self._pinned(txn).values())
        return max(self.cap - pinned, 0)

    def discard(self, key: bytes) -> None:
        with self.env.begin(write=True) as txn:
            self._remove(txn, key)

    def flush_touches(self) -> None:
        """Write down recent reads, in one write: a protected chunk moves to the young
        end; one on probation read `reuse_gap` after it came in is protected.

        Reads only note the key; doing the write per read would serialise all readers
        behind LMDB's single writer.
        """
        with self._touched_lock:
            touched, self._touched = self._touched, {}
        if not touched:
            return
        with self.env.begin(write=True) as txn:
            for key, read_at in touched.items():
                entry = self._entry(txn, key)
                if entry is None:
                    continue
                if entry.segment == PROTECTED:
                    self._unlink(txn, key)
                    self._link(txn, key, PROTECTED, entry.size, entry.since_us)
                elif read_at * 1e6 - entry.since_us >= self.reuse_gap * 1e6:
                    self._unlink(txn, key)
                    self._link(txn, key, PROTECTED, entry.size, self._now_us())
            self._demote(txn)

    def _demote(self, txn: lmdb.Transaction) -> None:
        """Protected chunks past their share go back to probation, the oldest first."""
        share = int(self._room(txn) * PROTECTED_SHARE)
        protected = self._read_counter(txn, b"protected")
        if protected <= share:
            return
        demoted = []
        for lru_key in self._oldest(txn, PROTECTED):
            if protected <= share:
                break
            key = lru_key[1 + _SEQ.size:]
            entry = self._entry(txn, key)
            protected -= entry.size if entry else 0
            demoted.append((key, entry))
        for key, entry in demoted:
            self._unlink(txn, key)
            if entry is not None:
                self._link(txn, key, PROBATION, entry.size, self._now_us())

    def _evict(self, txn: lmdb.Transaction, target: int) -> int:
        """Remove chunks, never pinned ones, down to `target` bytes: probation's oldest,
        then protected's oldest; the bytes removed."""
        total = self._read_counter(txn, b"total")
        pinned = {pin.prefix for pin in self._pinned(txn).values()}
        victims = []
        for segment, name in ((PROBATION, "probation"), (PROTECTED, "protected")):
            for lru_key in self._oldest(txn, segment):
                if total <= target:
                    break
                key = lru_key[1 + _SEQ.size:]
                if key[:PREFIX] in pinned:
                    continue
                entry = self._entry(txn, key)
                total -= entry.size if entry else 0
                victims.append(key)
                self.evictions[name] += 1
        return sum(self._remove(txn, key) for key in victims)

    def _oldest(self, txn: lmdb.Transaction, segment: int) -> Iterator[bytes]:
        """The eviction-order keys of one segment, oldest first. Callers stop iterating
        before they change anything."""
        cursor = txn.cursor(db=self._lru)
        if cursor.set_range(bytes([segment])):
            for lru_key in cursor.iternext(values=False):
                if lru_key[0] != segment:
                    return
                yield bytes(lru_key)

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

    # -- bookkeeping --------------------------------------------------------------------

    def _entry(self, txn: lmdb.Transaction, key: bytes) -> _Entry | None:
        meta = txn.get(key, db=self._cmeta)
        return None if meta is None or len(meta) != _CMETA.size else _Entry(*_CMETA.unpack(meta))

    def _link(self, txn: lmdb.Transaction, key: bytes, segment: int, size: int,
              since_us: int) -> None:
        """Record a chunk at the young end of `segment`, and count its bytes."""
        entry = _Entry(segment, self._next_seq(txn), size, since_us)
        txn.put(key, _CMETA.pack(*entry), db=self._cmeta)
        txn.put(entry.lru_key(key), b"", db=self._lru)
        self._add(txn, b"total", size)
        if segment == PROTECTED:
            self._add(txn, b"protected", size)

    def _unlink(self, txn: lmdb.Transaction, key: bytes) -> _Entry | None:
        """Forget a chunk's place and bytes (not its data); what it was, if anything."""
        entry = self._entry(txn, key)
        if entry is None:
            return None
        txn.delete(key, db=self._cmeta)
        txn.delete(entry.lru_key(key), db=self._lru)
        self._add(txn, b"total", -entry.size)
        if entry.segment == PROTECTED:
            self._add(txn, b"protected", -entry.size)
        return entry

    def _remove(self, txn: lmdb.Transaction, key: bytes) -> int:
        txn.delete(key, db=self._chunks)
        txn.delete(key, db=self._sums)
        entry = self._unlink(txn, key)
        return 0 if entry is None else entry.size

    def _add(self, txn: lmdb.Transaction, name: bytes, delta: int) -> None:
        value = max(self._read_counter(txn, name) + delta, 0)
        txn.put(name, _SEQ.pack(value), db=self._meta)

    def _now_us(self) -> int:
        return int(self.clock() * 1e6)

    def _next_seq(self, txn: lmdb.Transaction) -> int:
        seq = self._read_counter(txn, b"seq") + 1
        txn.put(b"seq", _SEQ.pack(seq), db=self._meta)
        return seq

    def _read_counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        raw = txn.get(name, db=self._meta)
        return _SEQ.unpack(raw)[0] if raw else 0
