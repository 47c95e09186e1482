"""Catalog gestures shared by the CLI and the mount: change, delete, restore, share.

Each is a read-modify-write of one manifest, loaded fresh from the store. Deletion is
Glance's delayed delete: the image turns `pending_delete` (gone from every folder, still
readable through open handles, restorable) and is purged by `scrub` after a grace period.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from imagefs import manifest as mf
from imagefs.catalog import CatalogStore
from imagefs.errors import ImageNotFound, InvalidValue, NotPermitted
from imagefs.records import ImageRecord, now_us, validate_project

log = logging.getLogger(__name__)


class CatalogAdmin:
    def __init__(self, catalog_store: CatalogStore,
                 on_change: Callable[[mf.Manifest], None] = lambda m: None,
                 on_purge: Callable[[str], None] = lambda image_id: None) -> None:
        self.catalog_store = catalog_store
        self._on_change = on_change
        self._on_purge = on_purge

    def update(self, image_id: str, change: Callable[[ImageRecord], None]) -> mf.Manifest:
        """Apply `change` to the stored record, validate, save, and announce it."""
        manifest = self.catalog_store.load(image_id)
        change(manifest.record)
        self.catalog_store.save(manifest)
        self._on_change(manifest)
        return manifest

    def delete(self, image_id: str, grace: float) -> None:
        """Delete as Glance does; a protected image refuses. grace <= 0 purges at once."""

        def mark(record: ImageRecord) -> None:
            if record.protected:
                raise NotPermitted(f"image {record.id} is protected; unprotect it first "
                                   f"(imagefs image set {record.id} --unprotected)")
            if record.status != "active":
                raise InvalidValue(f"image {record.id} is {record.status}, not active")
            record.status = "pending_delete"
            record.deleted_at = now_us()

        self.update(image_id, mark)
        log.info("image %s deleted; purged after %.0fs unless restored", image_id, grace)
        if grace <= 0:
            self.purge(image_id)

    def restore(self, image_id: str) -> mf.Manifest:
        def unmark(record: ImageRecord) -> None:
            if record.status != "pending_delete":
                raise InvalidValue(f"image {record.id} is {record.status}; only deleted "
                                   "images awaiting purge can be restored")
            record.status = "active"
            record.deleted_at = None

        return self.update(image_id, unmark)

    def purge(self, image_id: str, deleted_before: int | None = None) -> bool:
        """Remove a deleted image's manifest and data; True if this call purged it.

        The manifest is read fresh: an image restored meanwhile, or deleted again later
        than `deleted_before`, is left alone, and one purged by another host is done.
        """
        try:
            record = self.catalog_store.load(image_id).record
        except ImageNotFound:
            self._on_purge(image_id)
            return False
        if record.status != "pending_delete" or (
                deleted_before is not None and (record.deleted_at or 0) > deleted_before):
            return False
        self.catalog_store.delete(image_id)
        self._on_purge(image_id)
        log.info("image %s purged", image_id)
        return True

    def scrub(self, grace: float, manifests: list[mf.Manifest] | None = None) -> int:
        """Purge deleted images whose grace period has passed; returns how many."""
        due = now_us() - int(grace * 1_000_000)
        purged = 0
        for manifest in manifests if manifests is not None else self.catalog_store.load_all():
            record = manifest.record
            if record.status == "pending_delete" and (record.deleted_at or 0) <= due:
                purged += self.purge(record.id, deleted_before=due)
        return purged

    def set_member(self, image_id: str, project: str, status: str | None) -> mf.Manifest:
        """Invite (pending), accept, reject, or (status None) remove a member project."""
        validate_project(project)

        def change(record: ImageRecord) -> None:
            if status is None:
                if record.members.pop(project, None) is None:
                    raise InvalidValue(f"{project} is not a member of image {record.id}")
                return
            if project not in record.members:
                if status != "pending":
                    raise InvalidValue(f"{project} is not a member of image {record.id}")
                if record.visibility != "shared":
                    raise InvalidValue(
                        f"image {record.id} is {record.visibility}; only shared images have "
                        f"members (imagefs image set {record.id} --visibility shared)")
                if project == record.owner:
                    raise InvalidValue(f"{project} owns image {record.id}")
            record.members[project] = status

        return self.update(image_id, change)
