"""The change log and O(changes) refreshes, on file:// and on a real SeaweedFS S3 server.

Several "hosts" here are several Catalogs, each with its own LMDB cache and its own
store client, against one store: what several daemons do, without FUSE. The same
behaviour through real mounts on a SeaweedFS cluster is in test_fleet.py.
"""

from __future__ import annotations

import io
import threading
from collections import Counter

import pytest

from imagefs import change_log
from imagefs import manifest as mf
from imagefs.admin import CatalogAdmin
from imagefs.cache import open_environment
from imagefs.catalog import Catalog
from imagefs.catalog_index import CatalogIndex
from imagefs.catalog_store import CatalogStore
from imagefs.errors import InvalidValue
from imagefs.pipeline import upload_image
from imagefs.records import ImageRecord
from test_stores import _open


class Counting:
    """A store wrapper that counts calls, to show what a refresh costs."""

    def __init__(self, store):
        self._store = store
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if name in ("get", "get_versioned", "exists", "get_range", "put", "list", "delete"):
            def counted(*args, **kwargs):
                self.calls[name] += 1
                return attr(*args, **kwargs)
            return counted
        return attr


def host(store_handle, tmp_path, name, full_interval=3600.0):
    store = Counting(_open(store_handle))
    catalog_store = CatalogStore(store)
    env = open_environment(tmp_path / f"cache-{name}", 8 << 20)
    index = CatalogIndex(env, store.url)
    catalog_store.identity.expected = index.store_id
    catalog = Catalog(catalog_store, index, full_interval)
    catalog.load_cached()
    return catalog


def create(catalog_store, name):
    record = ImageRecord.new("acme", name=name, status="saving")
    return upload_image(catalog_store, io.BytesIO(name.encode() * 100), record, 1024)


def names(catalog):
    return sorted(m.record.name for m in catalog.snapshot.images.values())


def test_appends_from_many_writers_get_dense_distinct_numbers(store):
    stores = [CatalogStore(_open(store)) for _ in range(4)]
    taken: list[int] = []
    lock = threading.Lock()

    def write(catalog_store, n):
        for i in range(n):
            seq = catalog_store.log.append(f"image-{i}", "etag")
            with lock:
                taken.append(seq)

    threads = [threading.Thread(target=write, args=(s, 10)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == list(range(1, 41)), "two writers took one number, or a gap"
    assert [e.seq for e in stores[0].log.since(0)] == list(range(1, 41))


def test_an_idle_refresh_is_one_listing_whatever_the_catalog_size(store, tmp_path):
    a = host(store, tmp_path, "a")
    for i in range(30):
        create(a.catalog_store, f"img{i}")
    b = host(store, tmp_path, "b")
    b.refresh()  # a new host lists everything once
    assert len(b.snapshot.images) == 30
    b.catalog_store.store.calls.clear()
    assert not b.refresh()
    assert b.catalog_store.store.calls == {"list": 1}


def test_changes_on_one_host_reach_another_through_the_log(store, tmp_path):
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    first = create(a.catalog_store, "first")
    b.refresh()
    admin = CatalogAdmin(a.catalog_store)
    second = create(a.catalog_store, "second")
    admin.update(first.record.id, lambda r: setattr(r, "name", "renamed"))
    admin.delete(second.record.id, grace=0)  # purged at once
    b.catalog_store.store.calls.clear()
    assert b.refresh()
    assert names(b) == ["renamed"]
    calls = b.catalog_store.store.calls
    # one listing of the tail, the entries and the changed manifest; nothing listed whole
    assert calls["list"] == 1 and calls["get"] + calls["get_versioned"] <= 8, calls


def test_a_host_catches_up_from_where_it_left_off(store, tmp_path):
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    create(a.catalog_store, "before")
    b.refresh()
    b.index.env.close()  # b goes offline, keeping its cache dir
    for name in ("while-away-1", "while-away-2"):
        create(a.catalog_store, name)
    back = host(store, tmp_path, "b")  # same cache dir: starts from its cached catalog
    assert names(back) == ["before"] and back.position is not None
    assert back.refresh()
    assert names(back) == ["before", "while-away-1", "while-away-2"]
    assert "list" in back.catalog_store.store.calls
    assert back.catalog_store.store.calls["list"] <= 2, "it listed more than the log's tail"


def test_a_host_away_longer_than_the_log_starts_from_a_snapshot(store, tmp_path, monkeypatch):
    monkeypatch.setattr(change_log, "RETENTION", 0.0)
    monkeypatch.setattr("imagefs.catalog.SNAPSHOT_EVERY", 5)
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    create(a.catalog_store, "img0")
    b.refresh()
    b.index.env.close()  # b goes offline at entry 1
    for i in range(1, 12):
        create(a.catalog_store, f"img{i}")
        a.refresh()
        a.compact()
    assert len(a.catalog_store.log.snapshots()) == change_log.KEEP_SNAPSHOTS
    assert a.catalog_store.log.since(1) is None, "old entries were not trimmed"
    back = host(store, tmp_path, "b")
    assert back.refresh()
    assert names(back) == sorted(f"img{i}" for i in range(12))
    # the newest snapshot (entry 10) has the rest; only the manifests written after it
    # (entries 11 and 12: img10, img11) are fetched one by one
    assert back.catalog_store.store.calls["get_versioned"] == 2
    assert back.catalog_store.store.calls["list"] <= 4
    # and a new host too: snapshot, marker, the log's tail; no manifest listing
    new = host(store, tmp_path, "new")
    new.refresh()
    assert names(new) == names(back)
    assert new.catalog_store.store.calls["get_versioned"] == 2
    assert new.catalog_store.store.calls["list"] <= 2, new.catalog_store.store.calls


def test_a_damaged_snapshot_falls_back_to_listing(store, tmp_path, monkeypatch):
    monkeypatch.setattr(change_log, "RETENTION", 0.0)
    monkeypatch.setattr("imagefs.catalog.SNAPSHOT_EVERY", 2)
    a = host(store, tmp_path, "a")
    for i in range(6):
        create(a.catalog_store, f"img{i}")
        a.refresh()
        a.compact()
    newest = a.catalog_store.log.newest_snapshot()
    a.catalog_store.store.put(change_log.snapshot_key(newest), b"not a snapshot")
    b = host(store, tmp_path, "b")
    b.refresh()
    assert names(b) == sorted(f"img{i}" for i in range(6))


def test_a_change_the_log_missed_is_found_by_the_full_listing(store, tmp_path):
    a = host(store, tmp_path, "a")
    image = create(a.catalog_store, "x")
    b = host(store, tmp_path, "b")
    b.refresh()
    # A writer that died between its manifest write and its log entry:
    manifest, etag = a.catalog_store.load_versioned(image.record.id)
    manifest.record.name = "renamed"
    a.catalog_store.store.put(mf.manifest_key(image.record.id), manifest.encode(),
                              if_match=etag)
    b.refresh()
    assert names(b) == ["x"]  # the log says nothing
    b.full_interval = 0
    b._full_due = 0
    b.refresh()
    assert names(b) == ["renamed"]


def test_only_one_scrubber_purges_and_a_restore_first_wins(store, tmp_path, monkeypatch):
    stores = [CatalogStore(Counting(_open(store))) for _ in range(3)]
    admins = [CatalogAdmin(s) for s in stores]
    doomed = create(stores[0], "doomed")
    kept = create(stores[0], "kept")
    for image in (doomed, kept):
        admins[0].delete(image.record.id, grace=3600)
    admins[1].restore(kept.record.id)
    stale = [stores[2].load(doomed.record.id), stores[2].load(kept.record.id)]
    stale[1].record.status = "pending_delete"  # a scrubber whose view predates the restore
    results = [None, None]

    def scrub(i):
        results[i] = admins[i + 1].scrub(0, stale)

    threads = [threading.Thread(target=scrub, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == [doomed.record.id] for r in results), results
    deletes = sum(s.store.calls["delete"] for s in stores[1:])
    assert deletes == 3, "not exactly one scrubber removed manifest, block table and data"
    assert stores[0].load(kept.record.id).record.status == "active"
    assert not stores[0].store.exists(mf.data_key(doomed.record.id))
    # a restore after the purge was decided is refused, not half-done
    again = create(stores[0], "again")
    admins[0].delete(again.record.id, grace=3600)
    manifest, etag = stores[0].load_versioned(again.record.id)
    manifest.record.status = "deleted"  # a purge decided on another host, not yet finished
    stores[0].save(manifest, etag)
    with pytest.raises(InvalidValue, match="deleted"):
        admins[1].restore(again.record.id)
    # gone as far as this host is concerned, but removing it is left to the host that
    # decided, for a while
    assert admins[1].scrub(0) == [again.record.id]
    assert stores[0].store.exists(mf.data_key(again.record.id))
    monkeypatch.setattr("imagefs.admin._FINISH_AFTER", 0.0)
    assert admins[1].scrub(0) == [again.record.id]  # then any host finishes it
    assert not stores[0].store.exists(mf.data_key(again.record.id))


def test_a_host_restarting_after_a_crash_lists_everything_and_logs_what_it_missed(store,
                                                                                tmp_path):
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    image = create(a.catalog_store, "x")
    a.refresh()
    b.refresh()
    # a dies between its manifest write and the log entry
    manifest, etag = a.catalog_store.load_versioned(image.record.id)
    manifest.record.name = "renamed"
    a.catalog_store.store.put(mf.manifest_key(image.record.id), manifest.encode(),
                              if_match=etag)
    a.index.env.close()
    restarted = host(store, tmp_path, "a")
    restarted.load_cached(crashed=True)
    restarted.refresh()
    assert names(restarted) == ["renamed"]
    b.refresh()  # b reads the log only, and now the log has it
    assert names(b) == ["renamed"]
