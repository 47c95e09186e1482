"""Admin gestures on catalog files: rm, mv and setfattr mapped to catalog operations.

Pure policy over the namespace, the access rules, the catalog admin and the inbox; no
FUSE in here, so docs/semantics.md can be checked against one place. Every gesture asks
access.py whether the caller may make it, before anything is changed. Store work runs
in threads under `timeout`, so a gesture answers (EIO) even when the store stalls; what
it changed is then applied to the daemon's catalog.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import trio

from imagefs import manifest as mf
from imagefs.access import Policy, Who
from imagefs.admin import CatalogAdmin
from imagefs.blocking import BlockingCalls
from imagefs.catalog import Catalog
from imagefs.errors import (ImageNotFound, InvalidValue, NameTaken, NoSuchAttribute,
                            NotPermitted, ReadOnlyField)
from imagefs.inbox import Inbox
from imagefs.naming import clean_component, image_name, natural_name
from imagefs.namespace import (MEMBER_FOLDERS, VISIBILITY_FOLDERS, ImageNode, Namespace,
                               Path)
from imagefs.records import (MUTABLE_FIELDS, RESERVED_KEYS, ImageRecord, parse_field,
                             parse_json)

# Glance's status moves an admin may make (deactivate, reactivate), as setfattr of status.
STATUS_MOVES = {("active", "deactivated"), ("deactivated", "active")}


class Gestures:
    def __init__(self, namespace: Namespace, policy: Policy, admin: CatalogAdmin,
                 catalog: Catalog, inbox: Inbox, delete_grace: float, timeout: float) -> None:
        self.namespace = namespace
        self.policy = policy
        self.admin = admin
        self.catalog = catalog
        self.inbox = inbox
        self.delete_grace = delete_grace
        self.timeout = timeout
        self.store_calls = BlockingCalls(4)

    def _image(self, who: Who, folder: Path, name: str) -> ImageRecord:
        node = self.namespace.lookup(who, folder, name)
        if not isinstance(node, ImageNode):
            raise NotPermitted(f"{name} is a folder; folders are made by the catalog")
        return node.record

    async def _admin(self, fn: Callable[..., mf.Manifest | None], image_id: str,
                     *args: Any) -> None:
        """Run an admin operation on one image; show its outcome in the catalog."""
        manifest = await self.store_calls.run(fn, image_id, *args, timeout=self.timeout,
                                              what=f"change of image {image_id}")
        if manifest is None:  # purged
            await trio.to_thread.run_sync(self.catalog.forget, image_id)
        else:
            await trio.to_thread.run_sync(self.catalog.apply, manifest)

    def _inbox_entry(self, who: Who, folder: Path, name: str):  # type: ignore[no-untyped-def]
        self.policy.check_inbox(who, folder[1])
        entry = self.inbox.registry.lookup(folder[1], name)
        if entry is None:
            raise ImageNotFound(f"no {name} in the inbox of {folder[1]}")
        return entry

    # -- rm -----------------------------------------------------------------------------

    async def unlink(self, who: Who, folder: Path, name: str) -> None:
        if folder[:1] == ("inbox",) and len(folder) == 2:
            await self.inbox.files.unlink(self._inbox_entry(who, folder, name))
            return
        record = self._image(who, folder, name)
        if folder[:1] == ("tags",):  # rm inside tags/<t>/ only removes that tag
            tag = folder[1]
            self.policy.check_change(who, record, f"remove tag {tag} of image {record.id}")
            await self._admin(self.admin.update, record.id, lambda r: setattr(
                r, "tags", [t for t in r.tags if clean_component(t) != tag]))
        elif len(folder) == 3 and folder[2] in MEMBER_FOLDERS:  # decline the share
            self.policy.check_member_status(who, record, folder[1])
            await self._admin(self.admin.set_member_status, record.id, folder[1], "rejected")
        else:
            self.policy.check_change(who, record, f"delete image {record.id}")
            await self._admin(self.admin.delete, record.id, self.delete_grace)

    # -- mv -----------------------------------------------------------------------------

    async def rename(self, who: Who, old_folder: Path, old_name: str,
                     new_folder: Path, new_name: str) -> None:
        if old_folder[:1] == ("inbox",) or new_folder[:1] == ("inbox",):
            if old_folder[:1] != new_folder[:1] or len(old_folder) != 2 or len(new_folder) != 2:
                raise NotPermitted("files move into the inbox by copying, and leave it by "
                                   "being published")
            entry = self._inbox_entry(who, old_folder, old_name)
            self.policy.check_inbox(who, new_folder[1])
            await self.inbox.files.rename(entry, new_folder[1], new_name)
            return
        record = self._image(who, old_folder, old_name)
        if old_folder[:1] == ("by-id",) or new_folder[:1] == ("by-id",):
            raise NotPermitted("by-id/ names never change")
        self._refuse_clash(who, new_folder, new_name, record)
        # The same file name in another folder keeps the image's name as it is.
        renamed = new_name if new_name != old_name else None
        if old_folder == new_folder:
            self.policy.check_change(who, record, f"rename image {record.id}")
            await self._set_name(who, record, new_folder, renamed, None)
        elif self._project_folders(old_folder, new_folder, VISIBILITY_FOLDERS):
            self.policy.check_visibility(who, record, new_folder[2])
            await self._set_name(who, record, new_folder, renamed, new_folder[2])
        elif (self._project_folders(old_folder, new_folder, tuple(MEMBER_FOLDERS))
              and new_folder[2] == "shared-with-me"):
            self.policy.check_member_status(who, record, new_folder[1])
            await self._admin(self.admin.set_member_status, record.id, new_folder[1],
                              "accepted")
        else:
            raise NotPermitted(f"cannot move {'/'.join(old_folder)}/{old_name} to "
                               f"{'/'.join(new_folder)}/: only renames within a folder, "
                               "visibility changes within a project, and accepting "
                               "invitations are gestures")

    def _refuse_clash(self, who: Who, folder: Path, name: str, record: ImageRecord) -> None:
        try:
            target = self.namespace.lookup(who, folder, name)
        except ImageNotFound:
            return
        if not (isinstance(target, ImageNode) and target.record.id == record.id):
            raise NameTaken(f"{name} already exists in {'/'.join(folder)}; a rename never "
                            "replaces an image")

    @staticmethod
    def _project_folders(old: Path, new: Path, kinds: tuple[str, ...]) -> bool:
        return (len(old) == len(new) == 3 and old[0] == new[0] == "projects"
                and old[1] == new[1] and old[2] in kinds and new[2] in kinds)

    async def _set_name(self, who: Who, record: ImageRecord, folder: Path,
                        file_name: str | None, visibility: str | None) -> None:
        """A new name (the file name without a disk-format extension) and/or visibility."""
        name = image_name(file_name) if file_name else record.name
        moved = dataclasses.replace(record, name=name,
                                    visibility=visibility or record.visibility)
        self._refuse_clash(who, folder, natural_name(moved), record)

        def change(r: ImageRecord) -> None:
            r.name = moved.name
            r.visibility = moved.visibility

        await self._admin(self.admin.update, record.id, change)

    # -- setfattr -----------------------------------------------------------------------

    async def set_field(self, who: Who, record: ImageRecord, key: str, text: str) -> None:
        if key == "status":
            await self._set_status(who, record, text)
            return
        if key in RESERVED_KEYS and key not in MUTABLE_FIELDS:
            raise ReadOnlyField(f"{key} is read-only")
        self.policy.check_change(who, record, f"set {key} of image {record.id}")
        value = parse_field(key, text)  # only for those who may change it at all
        if key == "visibility":
            self.policy.check_visibility(who, record, value)

        def change(r: ImageRecord) -> None:
            if key in MUTABLE_FIELDS:
                setattr(r, key, value)
            else:
                r.properties[key] = value

        await self._admin(self.admin.update, record.id, change)

    async def _set_status(self, who: Who, record: ImageRecord, text: str) -> None:
        """Deactivate or reactivate (Glance's admin actions); no other status moves."""
        if (record.status, text) not in STATUS_MOVES:
            raise ReadOnlyField(f"status moves only between active and deactivated (image "
                                f"{record.id} is {record.status})")
        self.policy.check_admin(who, f"make image {record.id} {text}")
        await self._admin(self.admin.set_status, record.id, text)

    async def remove_field(self, who: Who, record: ImageRecord, key: str) -> None:
        if key in RESERVED_KEYS:
            raise ReadOnlyField(f"{key} is a Glance field; it can be changed, not removed")
        self.policy.check_change(who, record, f"remove {key} of image {record.id}")

        def change(r: ImageRecord) -> None:
            if r.properties.pop(key, None) is None:
                raise NoSuchAttribute(f"image {r.id} has no property {key}")

        await self._admin(self.admin.update, record.id, change)

    async def set_members(self, who: Who, record: ImageRecord, text: str) -> None:
        """The projects an image is shared with: new ones are invited, missing ones
        removed; statuses are the members' own to answer (mv and rm)."""
        self.policy.check_change(who, record, f"change the members of image {record.id}")
        expected = 'members must be a JSON array of projects, e.g. ["beta"]'
        projects = parse_json(text, expected)
        if not isinstance(projects, list) or not all(isinstance(p, str) for p in projects):
            raise InvalidValue(expected)
        await self._admin(self.admin.set_members, record.id, projects)
