"""The LMDB chunk cache: hard cap, LRU order, damaged entries, restarts."""

from __future__ import annotations

import os

from imagefs.cache import ChunkCache, chunk_key, image_prefix, open_environment
from imagefs.catalog_index import CatalogIndex

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


# -- pins ---------------------------------------------------------------------------------

OTHER = "3f1c2a9e-0000-4000-8000-000000000002"


def other_key(n: int) -> bytes:
    return chunk_key(OTHER, HASH, CHUNK, n)


def test_eviction_skips_pinned_chunks_and_keeps_the_cap(tmp_path):
    c = cache(tmp_path)
    c.pin(ID, image_prefix(ID, HASH), 4 * CHUNK)
    for n in range(4):  # the oldest chunks, and pinned
        c.put(key(n), bytes([n]) * CHUNK)
    for n in range(30):
        c.put(other_key(n), b"o" * CHUNK)
        assert c.total_bytes() <= c.cap
    assert all(c.get(key(n)) == bytes([n]) * CHUNK for n in range(4))
    assert c.get(other_key(0)) is None and c.get(other_key(29)) is not None
    assert sum(c.chunks(image_prefix(ID, HASH)).values()) == 4 * CHUNK
    assert c.usage() == {image_prefix(ID, HASH): 4 * CHUNK,
                         image_prefix(OTHER, HASH): c.total_bytes() - 4 * CHUNK}
    assert c.unpin(ID) and not c.unpin(ID)
    for n in range(30, 40):
        c.put(other_key(n), b"o" * CHUNK)
    assert c.get(key(0)) is None, "an unpinned chunk outlived newer ones"


def test_a_cache_full_of_pins_stays_under_the_cap(tmp_path):
    c = cache(tmp_path, cap=4 * CHUNK)
    c.pin(ID, image_prefix(ID, HASH), 5 * CHUNK)  # more than the cap: pinning.py refuses that
    for n in range(5):
        c.put(key(n), b"p" * CHUNK)
        assert c.total_bytes() <= c.cap
    assert c.entry_count() == 4 and c.get(key(4)) is None
    c.put(other_key(0), b"o" * CHUNK)  # no room either: it evicts itself, not a pin
    assert c.total_bytes() <= c.cap and c.get(other_key(0)) is None


def test_pins_survive_a_restart_and_drop_all_discards(tmp_path):
    c = cache(tmp_path)
    c.pin(ID, image_prefix(ID, HASH), CHUNK)
    c.put(key(0), b"y" * CHUNK)
    c.put(other_key(0), b"z" * CHUNK)
    c.env.sync(True)
    c.env.close()
    c = cache(tmp_path)
    assert [(i, p.prefix, p.size) for i, p in c.pins().items()] == \
        [(ID, image_prefix(ID, HASH), CHUNK)]
    assert c.discard_all([other_key(0)]) == CHUNK and c.total_bytes() == CHUNK


def test_a_cache_dir_reused_for_another_store_drops_its_pins(tmp_path):
    c = cache(tmp_path)
    CatalogIndex(c.env, "file:///srv/a")
    c.pin(ID, image_prefix(ID, HASH), CHUNK)
    CatalogIndex(c.env, "file:///srv/a")
    assert ID in c.pins()
    CatalogIndex(c.env, "s3://other/catalog")
    assert c.pins() == {}
