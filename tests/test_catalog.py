"""Catalog and admin logic against a real file:// store, without FUSE."""

from __future__ import annotations

import io

import pytest

from imagefs.admin import CatalogAdmin
from imagefs.cache import open_environment
from imagefs.catalog import Catalog
from imagefs.catalog_index import CatalogIndex
from imagefs.catalog_store import CatalogStore
from imagefs.pipeline import upload_image
from imagefs.records import ImageRecord
from imagefs.stores import open_store


def setup(tmp_path, full_interval=3600.0):
    (tmp_path / "store").mkdir()
    catalog_store = CatalogStore(open_store(f"file://{tmp_path / 'store'}"))
    env = open_environment(tmp_path / "cache", 1 << 20)
    catalog = Catalog(catalog_store, CatalogIndex(env, catalog_store.store.url), full_interval)
    return catalog_store, catalog


def create(catalog_store, name="x"):
    record = ImageRecord.new("acme", name=name, status="saving")
    return upload_image(catalog_store, io.BytesIO(b"z" * 5000), record, 1024)


@pytest.mark.parametrize("read", ["listing", "log"])
def test_a_refresh_does_not_undo_changes_made_while_it_ran(tmp_path, read):
    """Whether the refresh lists every manifest or reads the change log's tail."""
    catalog_store, catalog = setup(tmp_path, full_interval=0 if read == "listing" else 3600)
    old = create(catalog_store, "old")
    catalog.refresh()
    admin = CatalogAdmin(catalog_store)
    owner, name = (catalog_store, "manifest_etags") if read == "listing" else \
        (catalog_store.log, "since")
    real = getattr(owner, name)
    made = {}

    def read_then_local_changes(*args):
        found = real(*args)  # what the refresh read predates the changes below
        made["new"] = create(catalog_store, "new")
        catalog.apply(made["new"])
        catalog.apply(admin.update(old.record.id, lambda r: setattr(r, "min_ram", 4096)))
        return found

    setattr(owner, name, read_then_local_changes)
    catalog.refresh()
    setattr(owner, name, real)
    assert made["new"].record.id in catalog.snapshot.images, "a new image vanished"
    assert catalog.snapshot.record(old.record.id).min_ram == 4096, "a change was undone"
    catalog.refresh()  # and the next refresh agrees with the store
    assert catalog.snapshot.record(old.record.id).min_ram == 4096
    assert made["new"].record.id in catalog.snapshot.images


def test_scrub_never_purges_an_image_restored_meanwhile(tmp_path):
    catalog_store, catalog = setup(tmp_path)
    admin = CatalogAdmin(catalog_store)
    image = create(catalog_store)
    admin.delete(image.record.id, grace=3600)
    stale = catalog_store.load_all()  # a snapshot taken while it was deleted
    admin.restore(image.record.id)
    assert admin.scrub(0, stale) == []
    assert catalog_store.load(image.record.id).record.status == "active"
    admin.delete(image.record.id, grace=3600)
    assert admin.scrub(0) == [image.record.id]
    # purged already (e.g. by another host): no error, and it is gone
    assert admin.scrub(0, stale) == [image.record.id]
