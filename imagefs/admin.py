"""Catalog gestures shared by the CLI and the mount: change, delete, restore, share.

Each is a read-modify-write of one manifest, loaded fresh from the store and saved only
over the version it read (a conditional write); when someone else saved first, the
change is applied again to their version. Gestures on one image from one process are
also serialised, so they do not race each other at all. Deletion is Glance's delayed
delete: the image turns `pending_delete` (gone from every folder, still readable
through open handles, restorable) and is purged by `scrub` after a grace period.

Blocking. Callers apply the returned manifests to their own view of the catalog.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable

from imagefs import manifest as mf
from imagefs.catalog_store import CatalogStore
from imagefs.errors import (ImageNotFound, InvalidValue, NameTaken, NotPermitted,
                            ObjectChanged)
from imagefs.records import MAX_MEMBERS, ImageRecord, now_us, validate_project
from imagefs.retry import Backoff

log = logging.getLogger(__name__)
_ATTEMPTS = 8
_CONFLICT_BACKOFF = Backoff(first=0.02, most=0.5)
_STRIPES = 64
PURGEABLE = ("pending_delete", "deleted")  # deleted: a purge decided but not finished
_FINISH_AFTER = 300.0  # s after which a purge decided elsewhere is finished here


class CatalogAdmin:
    def __init__(self, catalog_store: CatalogStore) -> None:
        self.catalog_store = catalog_store
        self._url = catalog_store.store.url  # for the commands that error messages suggest
        # Striped rather than one lock per image: bounded memory, and images rarely share.
        self._locks = [threading.Lock() for _ in range(_STRIPES)]

    def _lock(self, image_id: str) -> threading.Lock:
        return self._locks[zlib.crc32(image_id.encode()) % _STRIPES]

    def update(self, image_id: str, change: Callable[[ImageRecord], None]) -> mf.Manifest:
        """Apply `change` to the stored record, validate, and save; no change is lost."""
        with self._lock(image_id):
            for attempt in range(_ATTEMPTS):
                manifest, etag = self.catalog_store.load_versioned(image_id)
                change(manifest.record)
                try:
                    self.catalog_store.save(manifest, etag)
                    return manifest
                except ObjectChanged:
                    log.info("image %s changed elsewhere while we changed it; applying the "
                             "change again (attempt %d)", image_id, attempt + 1)
                    time.sleep(_CONFLICT_BACKOFF.delay(attempt))
        raise ObjectChanged(f"image {image_id} keeps being changed elsewhere; try again")

    def delete(self, image_id: str, grace: float) -> mf.Manifest | None:
        """Delete as Glance does; a protected image refuses. grace <= 0 purges at once.

        Returns the deleted image's manifest, or None if it was purged.
        """

        def mark(record: ImageRecord) -> None:
            if record.protected:
                raise NotPermitted(f"image {record.id} is protected; unprotect it first "
                                   f"(imagefs image set --store {self._url} {record.id} "
                                   "--unprotected)")
            if record.status != "active":
                raise InvalidValue(f"image {record.id} is {record.status}, not active")
            record.status = "pending_delete"
            record.deleted_at = now_us()

        manifest = self.update(image_id, mark)
        log.info("image %s deleted; purged after %.0fs unless restored", image_id, grace)
        if grace <= 0 and self.purge(image_id):
            return None
        return manifest

    def restore(self, image_id: str) -> mf.Manifest:
        def unmark(record: ImageRecord) -> None:
            if record.status != "pending_delete":
                raise InvalidValue(f"image {record.id} is {record.status}; only deleted "
                                   "images awaiting purge can be restored")
            record.status = "active"
            record.deleted_at = None

        return self.update(image_id, unmark)

    def purge(self, image_id: str, deleted_before: int | None = None) -> bool:
        """Remove a deleted image's manifest and data; True if the image is gone now.

        Two steps, so that with several hosts scrubbing exactly one decides and a
        restore anywhere wins: the image is first marked `deleted` by a conditional
        write of the version read (an image restored meanwhile, or deleted again later
        than `deleted_before`, is left alone), then removed. Removing is idempotent, so
        a host that finds the mark (its maker may have died) finishes the purge.
        """
        with self._lock(image_id):
            lost_race = False
            for _attempt in range(_ATTEMPTS):
                try:
                    manifest, etag = self.catalog_store.load_versioned(image_id)
                except ImageNotFound:
                    return True
                record = manifest.record
                if record.status == "deleted":
                    if lost_race or now_us() - record.updated_at < _FINISH_AFTER * 1_000_000:
                        return True  # another host decided just now and is purging it
                    break  # decided long ago: its maker died before finishing
                if record.status != "pending_delete" or (
                        deleted_before is not None and (record.deleted_at or 0) > deleted_before):
                    return False
                record.status = "deleted"
                try:
                    self.catalog_store.save(manifest, etag)
                    break
                except ObjectChanged:
                    lost_race = True  # look again: restored, or decided elsewhere
            else:
                return False
            self.catalog_store.delete(image_id)
        log.info("image %s purged", image_id)
        return True

    def scrub(self, grace: float, manifests: list[mf.Manifest] | None = None) -> list[str]:
        """Purge deleted images whose grace period has passed; returns the ids now gone."""
        due = now_us() - int(grace * 1_000_000)
        gone = []
        for manifest in manifests if manifests is not None else self.catalog_store.load_all():
            record = manifest.record
            if record.status in PURGEABLE and (record.deleted_at or 0) <= due \
                    and self.purge(record.id, deleted_before=due):
                gone.append(record.id)
        return gone

    def set_status(self, image_id: str, status: str) -> mf.Manifest:
        """Deactivate (active -> deactivated) or reactivate (back), as Glance's admin can."""

        def change(record: ImageRecord) -> None:
            if (record.status, status) not in (("active", "deactivated"),
                                               ("deactivated", "active")):
                raise InvalidValue(f"image {record.id} is {record.status}; only active images "
                                   "deactivate and only deactivated ones reactivate")
            record.status = status

        return self.update(image_id, change)

    # -- members (Glance's image members: only shared images have them) -----------------

    def add_member(self, image_id: str, project: str) -> mf.Manifest:
        """Invite a project; it starts pending, and only it may accept or reject."""
        validate_project(project)

        def change(record: ImageRecord) -> None:
            _check_shareable(record, project, self._url)
            if project in record.members:
                raise NameTaken(f"{project} is already a member of image {record.id}")
            if len(record.members) >= MAX_MEMBERS:
                raise InvalidValue(f"image {record.id} has {MAX_MEMBERS} members, the most "
                                   "Glance allows")
            record.members[project] = "pending"

        return self.update(image_id, change)

    def set_member_status(self, image_id: str, project: str, status: str) -> mf.Manifest:
        """A member's answer: accepted, rejected (or back to pending)."""

        def change(record: ImageRecord) -> None:
            if project not in record.members:
                raise InvalidValue(f"{project} is not a member of image {record.id}")
            record.members[project] = status

        return self.update(image_id, change)

    def remove_member(self, image_id: str, project: str) -> mf.Manifest:
        def change(record: ImageRecord) -> None:
            if record.members.pop(project, None) is None:
                raise InvalidValue(f"{project} is not a member of image {record.id}")

        return self.update(image_id, change)

    def set_members(self, image_id: str, projects: list[str]) -> mf.Manifest:
        """Exactly these members: new ones pending, the others keep their answers."""
        for project in projects:
            validate_project(project)
        if len(set(projects)) != len(projects):
            raise InvalidValue("a project is listed twice among the members")
        if len(projects) > MAX_MEMBERS:
            raise InvalidValue(f"{len(projects)} members; Glance allows at most {MAX_MEMBERS}")

        def change(record: ImageRecord) -> None:
            for project in projects:
                _check_shareable(record, project, self._url)
            record.members = {p: record.members.get(p, "pending") for p in projects}

        return self.update(image_id, change)


def _check_shareable(record: ImageRecord, project: str, url: str) -> None:
    if record.visibility != "shared":
        raise InvalidValue(f"image {record.id} is {record.visibility}; only shared images have "
                           f"members (imagefs image set --store {url} {record.id} "
                           "--visibility shared)")
    if project == record.owner:
        raise InvalidValue(f"{project} owns image {record.id}")
