"""Admin gestures on catalog files: rm, mv and setfattr mapped to catalog operations.

Pure policy over the namespace, the catalog admin and the inbox; no FUSE in here, so
docs/semantics.md can be checked against one place. Store work runs in threads under
`timeout`, so a gesture answers (EIO) even when the store stalls; what it changed is
then applied to the daemon's catalog.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import trio

from imagefs import manifest as mf
from imagefs.access import Caller
from imagefs.admin import CatalogAdmin
from imagefs.blocking import BlockingCalls
from imagefs.catalog import Catalog
from imagefs.errors import (ImageNotFound, NameTaken, NoSuchAttribute, NotPermitted,
                            ReadOnlyField)
from imagefs.inbox import Inbox
from imagefs.naming import clean_component, natural_name, split_extension
from imagefs.namespace import MEMBER_FOLDERS, VISIBILITY_FOLDERS, Namespace, Path
from imagefs.records import MUTABLE_FIELDS, RESERVED_KEYS, ImageRecord, parse_field


class Gestures:
    def __init__(self, namespace: Namespace, admin: CatalogAdmin, catalog: Catalog,
                 inbox: Inbox, delete_grace: float, timeout: float) -> None:
        self.namespace = namespace
        self.admin = admin
        self.catalog = catalog
        self.inbox = inbox
        self.delete_grace = delete_grace
        self.timeout = timeout
        self.store_calls = BlockingCalls(4)

    def _image(self, caller: Caller, folder: Path, name: str) -> ImageRecord:
        entry = self.namespace.lookup(caller, folder, name)
        record = self.namespace.image_for_inode(caller, entry.inode) if entry else None
        if record is None:
            raise ImageNotFound(f"no {name} in {'/'.join(folder)}")
        return record

    async def _admin(self, fn: Callable[..., mf.Manifest | None], image_id: str,
                     *args: Any) -> None:
        """Run an admin operation on one image; show its outcome in the catalog."""
        manifest = await self.store_calls.run(fn, image_id, *args, timeout=self.timeout,
                                              what=f"change of image {image_id}")
        if manifest is None:  # purged
            await trio.to_thread.run_sync(self.catalog.forget, image_id)
        else:
            await trio.to_thread.run_sync(self.catalog.apply, manifest)

    # -- rm -----------------------------------------------------------------------------

    async def unlink(self, caller: Caller, folder: Path, name: str) -> None:
        if folder[:1] == ("inbox",) and len(folder) == 2:
            entry = self.inbox.registry.lookup(folder[1], name)
            if entry is None:
                raise ImageNotFound(f"no {name} in the inbox of {folder[1]}")
            await self.inbox.files.unlink(entry)
            return
        record = self._image(caller, folder, name)
        if folder[:1] == ("tags",):  # rm inside tags/<t>/ only removes that tag
            tag = folder[1]
            await self._admin(self.admin.update, record.id, lambda r: setattr(
                r, "tags", [t for t in r.tags if clean_component(t) != tag]))
        elif len(folder) == 3 and folder[2] in MEMBER_FOLDERS:  # decline the share
            await self._admin(self.admin.set_member, record.id, folder[1], "rejected")
        else:
            await self._admin(self.admin.delete, record.id, self.delete_grace)

    # -- mv -----------------------------------------------------------------------------

    async def rename(self, caller: Caller, old_folder: Path, old_name: str,
                     new_folder: Path, new_name: str) -> None:
        if old_folder[:1] == ("inbox",) or new_folder[:1] == ("inbox",):
            if old_folder[:1] != new_folder[:1] or len(old_folder) != 2 or len(new_folder) != 2:
                raise NotPermitted("files move into the inbox by copying, and leave it by "
                                   "being published")
            entry = self.inbox.registry.lookup(old_folder[1], old_name)
            if entry is None:
                raise ImageNotFound(f"no {old_name} in the inbox of {old_folder[1]}")
            await self.inbox.files.rename(entry, new_folder[1], new_name)
            return
        record = self._image(caller, old_folder, old_name)
        if old_folder[:1] == ("by-id",) or new_folder[:1] == ("by-id",):
            raise NotPermitted("by-id/ names never change")
        target = self.namespace.lookup(caller, new_folder, new_name)
        if target is not None and target.image_id != record.id:
            raise NameTaken(f"{new_name} already exists; a rename never replaces an image")
        # The same file name in another folder keeps the image's name as it is.
        renamed = new_name if new_name != old_name else None
        if old_folder == new_folder:
            await self._set_name(caller, record, new_folder, renamed, None)
        elif self._project_folders(old_folder, new_folder, VISIBILITY_FOLDERS):
            await self._set_name(caller, record, new_folder, renamed, new_folder[2])
        elif (self._project_folders(old_folder, new_folder, tuple(MEMBER_FOLDERS))
              and new_folder[2] == "shared-with-me"):
            await self._admin(self.admin.set_member, record.id, new_folder[1], "accepted")
        else:
            raise NotPermitted(f"cannot move {'/'.join(old_folder)}/{old_name} to "
                               f"{'/'.join(new_folder)}/: only renames within a folder, "
                               "visibility changes within a project, and accepting "
                               "invitations are gestures")

    @staticmethod
    def _project_folders(old: Path, new: Path, kinds: tuple[str, ...]) -> bool:
        return (len(old) == len(new) == 3 and old[0] == new[0] == "projects"
                and old[1] == new[1] and old[2] in kinds and new[2] in kinds)

    async def _set_name(self, caller: Caller, record: ImageRecord, folder: Path,
                        file_name: str | None, visibility: str | None) -> None:
        """A new name (the file name without the rule's extension) and/or visibility."""
        name = split_extension(file_name, record.disk_format)[0] if file_name else record.name
        moved = dataclasses.replace(record, name=name,
                                    visibility=visibility or record.visibility)
        clash = self.namespace.lookup(caller, folder, natural_name(moved))
        if clash is not None and clash.image_id != record.id:
            raise NameTaken(f"{natural_name(moved)} already exists in {'/'.join(folder)}")

        def change(r: ImageRecord) -> None:
            r.name = moved.name
            r.visibility = moved.visibility

        await self._admin(self.admin.update, record.id, change)

    # -- setfattr -----------------------------------------------------------------------

    async def set_field(self, record: ImageRecord, key: str, text: str) -> None:
        if key in RESERVED_KEYS and key not in MUTABLE_FIELDS:
            raise ReadOnlyField(f"{key} is read-only")
        value = parse_field(key, text)

        def change(r: ImageRecord) -> None:
            if key in MUTABLE_FIELDS:
                setattr(r, key, value)
            else:
                r.properties[key] = value

        await self._admin(self.admin.update, record.id, change)

    async def remove_field(self, record: ImageRecord, key: str) -> None:
        if key in RESERVED_KEYS:
            raise ReadOnlyField(f"{key} is a Glance field; it can be changed, not removed")

        def change(r: ImageRecord) -> None:
            if r.properties.pop(key, None) is None:
                raise NoSuchAttribute(f"image {r.id} has no property {key}")

        await self._admin(self.admin.update, record.id, change)
