"""The LMDB chunk cache: hard cap, LRU order, damaged entries, restarts."""

from __future__ import annotations

import os

from imagefs.cache import ChunkCache, chunk_key, open_environment

ID = "3f1c2a9e-0000-4000-8000-000000000001"
HASH = "ab" * 64
CHUNK = 64 << 10


def key(n: int) -> bytes:
    return chunk_key(ID, HASH, CHUNK, n)


def cache(tmp_path, cap=10 * CHUNK) -> ChunkCache:
    return ChunkCache(open_environment(tmp_path, cap), cap)


def test_put_get_round_trip(tmp_path):
    c = cache(tmp_path)
    data = os.urandom(CHUNK)
    c.put(key(0), data)
    assert c.get(key(0)) == data
    assert c.get(key(1)) is None
    assert c.total_bytes() == CHUNK


def test_never_grows_past_the_cap_and_evicts_oldest(tmp_path):
    c = cache(tmp_path)
    for n in range(25):
        c.put(key(n), bytes([n]) * CHUNK)
        assert c.total_bytes() <= c.cap
    assert c.get(key(0)) is None
    assert c.get(key(24)) == bytes([24]) * CHUNK
    assert c.entry_count() * CHUNK == c.total_bytes()


def test_recently_read_chunks_survive_eviction(tmp_path):
    c = cache(tmp_path)
    for n in range(10):
        c.put(key(n), bytes([n]) * CHUNK)
    assert c.get(key(0)) is not None
    c.flush_touches()
    for n in range(10, 14):
        c.put(key(n), bytes([n]) * CHUNK)
    assert c.get(key(0)) is not None, "a recently read chunk was evicted first"
    assert c.get(key(1)) is None


def test_damaged_entry_is_a_miss_and_dropped(tmp_path):
    c = cache(tmp_path)
    c.put(key(0), b"x" * CHUNK)
    chunks = c.env.open_db(b"chunks")
    with c.env.begin(write=True, db=chunks) as txn:
        txn.put(key(0), bytes(txn.get(key(0)))[:-1])  # torn: shorter than its header says
    assert c.get(key(0)) is None
    assert c.total_bytes() == 0


def test_ranges_copy_only_what_is_asked(tmp_path):
    c = cache(tmp_path)
    data = os.urandom(CHUNK)
    c.put(key(0), data)
    assert c.get_range(key(0), 1000, 4096) == data[1000:5096]
    assert c.get_range(key(0), CHUNK - 10, 10) == data[-10:]
    assert c.get_range(key(1), 0, 10) is None


def test_survives_restart(tmp_path):
    c = cache(tmp_path)
    c.put(key(3), b"y" * CHUNK)
    c.env.sync(True)
    c.env.close()
    assert cache(tmp_path).get(key(3)) == b"y" * CHUNK


def test_damaged_environment_is_recreated(tmp_path):
    (tmp_path / "lmdb").mkdir()
    (tmp_path / "lmdb" / "data.mdb").write_bytes(b"not an lmdb file" * 1000)
    c = cache(tmp_path)
    c.put(key(0), b"z" * 10)
    assert c.get(key(0)) == b"z" * 10


def test_oversized_chunk_is_not_cached(tmp_path):
    c = cache(tmp_path, cap=CHUNK)
    c.put(key(0), b"q" * (CHUNK + 1))
    assert c.get(key(0)) is None and c.total_bytes() == 0


def test_keys_differ_by_identity_checksum_geometry_and_number():
    base = chunk_key(ID, HASH, CHUNK, 1)
    assert base != chunk_key(ID, "cd" * 64, CHUNK, 1)
    assert base != chunk_key(ID, HASH, CHUNK * 2, 1)
    assert base != chunk_key(ID, HASH, CHUNK, 2)
    assert base != chunk_key("3f1c2a9e-0000-4000-8000-000000000002", HASH, CHUNK, 1)
