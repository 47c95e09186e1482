"""Metadata as xattrs: what getfattr shows of each node, and what setfattr changes.

Images show their Glance v2 JSON form as `user.glance.<key>` and their members as
`user.imagefs.members`; inbox files show their upload status and the fields they will
be published with; the root shows the daemon's counters and status (what `imagefs
status` prints), an inbox folder its recent publishes, and every folder the caller's
last refusal there (refusals.py). Changes to images are gestures (gestures.py), changes
to inbox files go to the spool; both ask access.py first. `user.imagefs.cache`
(pinning.py) is asked for by name and never listed: it is the mount's state, not the
image's, and copying tools must not carry it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio

from imagefs import xattrs
from imagefs.access import Policy, Who
from imagefs.errors import InvalidValue, NoSuchAttribute, NotPermitted, UnsupportedAttribute
from imagefs.gestures import Gestures
from imagefs.inbox import Inbox
from imagefs.namespace import FolderNode, ImageNode, InboxNode, Node
from imagefs.pinning import CacheControl
from imagefs.records import json_text
from imagefs.refusals import Refusals

GLANCE = xattrs.GLANCE_PREFIX
_XATTR_MAX = 65536  # the kernel's limit on an xattr value (XATTR_SIZE_MAX)


class Metadata:
    def __init__(self, policy: Policy, inbox: Inbox, gestures: Gestures,
                 stats: Callable[[], dict[str, Any]], status: Callable[[], dict[str, Any]],
                 cache: CacheControl,
                 refusals: Refusals | None = None) -> None:
        self.policy = policy
        self.inbox = inbox
        self.gestures = gestures
        self._stats = stats
        self.cache = cache
        self._status = status
        self.refusals = refusals or Refusals()

    def items(self, who: Who, node: Node) -> dict[str, str]:
        """Every xattr of the node, as the caller sees it."""
        if isinstance(node, ImageNode):
            items = {GLANCE + k: v for k, v in node.record.metadata_items().items()}
            members = self.policy.members_shown(who, node.record)
            if members:
                items[xattrs.MEMBERS] = json.dumps(members, sort_keys=True)
            return items
        if isinstance(node, InboxNode):
            entry = node.entry
            items = {xattrs.STATUS: entry.status}
            if not entry.is_error:
                items[xattrs.IMAGE_ID] = entry.record.entry_id
            items.update({GLANCE + k: json_text(v) for k, v in entry.record.metadata.items()})
            return items
        items: dict[str, str] = {}
        refused = self.refusals.last(who.uid, node.path)
        if refused is not None:
            items[xattrs.LAST_ERROR] = refused
        items.update({k: json.dumps(f(), sort_keys=True)
                      for k, f in self._daemon(who, node).items()})
        if node.path[:1] == ("inbox",) and len(node.path) == 2:
            published = self.inbox.registry.recently_published(node.path[1])
            items[xattrs.PUBLISHED] = json.dumps(published, sort_keys=True)
        return items

    def _sees_counters(self, who: Who) -> bool:
        """The counters say how many images there are, the status names recent refusals
        of every caller: admins only."""
        return who.admin or not self.policy.caller_dependent()

    def _daemon(self, who: Who, node: Node) -> dict[str, Callable[[], dict[str, Any]]]:
        """The root's counters and status, computed only when read."""
        if not isinstance(node, FolderNode) or node.path or not self._sees_counters(who):
            return {}
        return {xattrs.STATS: self._stats, xattrs.DAEMON: self._status}

    async def get(self, who: Who, node: Node, key: str) -> str:
        if not key.startswith(xattrs.USER_NAMESPACE):
            # `ls -l` asks every file for security.selinux and system.posix_acl_access:
            # answered without building the node's xattrs (a 10,000-image `ls -l` spent
            # 34 % of the daemon's CPU there).
            raise NoSuchAttribute(f"{key} is not set")
        if key == xattrs.CACHE:
            return _fitting(await self._cache_state(who, node))
        daemon = self._daemon(who, node).get(key)
        if daemon is not None:
            return json.dumps(daemon(), sort_keys=True)
        value = self.items(who, node).get(key)
        if value is None:
            raise NoSuchAttribute(f"{key} is not set")
        return value

    async def _cache_state(self, who: Who, node: Node) -> dict[str, Any]:
        """An image's cache state, or the whole cache's on the root (a scan: a thread)."""
        if isinstance(node, ImageNode):
            return await trio.to_thread.run_sync(self.cache.image_state, node.manifest)
        if isinstance(node, FolderNode) and not node.path and self._sees_counters(who):
            return await trio.to_thread.run_sync(self.cache.status)
        raise NoSuchAttribute(f"{xattrs.CACHE} is on images and the mount root")

    async def set(self, who: Who, node: Node, key: str, value: bytes) -> None:
        text = _text(value)
        if key == xattrs.CACHE:
            if not isinstance(node, ImageNode):
                raise NotPermitted(f"{xattrs.CACHE} is set on images: pin, unpin or drop")
            await self.cache.change(who, node.manifest, text.strip())
            return
        if isinstance(node, ImageNode) and key == xattrs.MEMBERS:
            await self.gestures.set_members(who, node.record, text)
            return
        field = _glance_field(key)
        if isinstance(node, InboxNode):
            project = node.entry.record.project
            self.policy.check_inbox(who, project)
            await self.inbox.files.set_metadata(
                node.entry, field, text,
                lambda value: self.policy.check_upload_field(who, project, field, value))
        elif isinstance(node, ImageNode):
            await self.gestures.set_field(who, node.record, field, text)
        else:
            raise NotPermitted("folders carry no metadata")

    async def remove(self, who: Who, node: Node, key: str) -> None:
        if isinstance(node, ImageNode) and key == xattrs.MEMBERS:
            await self.gestures.set_members(who, node.record, "[]")
            return
        field = _glance_field(key)
        if isinstance(node, InboxNode):
            self.policy.check_inbox(who, node.entry.record.project)
            await self.inbox.files.set_metadata(node.entry, field, None)
        elif isinstance(node, ImageNode):
            await self.gestures.remove_field(who, node.record, field)
        else:
            raise NotPermitted("folders carry no metadata")


def _fitting(state: dict[str, Any]) -> str:
    """JSON within the kernel's limit on an xattr value: a cache holding more images than
    fit lists the pinned and the largest, and says how many it left out."""
    text = json.dumps(state, sort_keys=True, separators=(",", ":"))
    images = state.get("images", [])
    while len(text.encode()) > _XATTR_MAX and images:
        images = images[:len(images) * 3 // 4]
        text = json.dumps({**state, "images": images,
                           "images_left_out": len(state["images"]) - len(images)},
                          sort_keys=True, separators=(",", ":"))
    return text


def _glance_field(key: str) -> str:
    if not key.startswith(GLANCE):
        raise UnsupportedAttribute(f"{key}: only {GLANCE}* (and {xattrs.MEMBERS} on images) "
                                   "can be set")
    return key[len(GLANCE):]


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidValue("xattr values are UTF-8 text") from None

