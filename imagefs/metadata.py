"""Metadata as xattrs: what getfattr shows of each node, and what setfattr changes.

Images show their Glance v2 JSON form as `user.glance.<key>` and their members as
`user.imagefs.members`; inbox files show their upload status and the fields they will
be published with; the root shows the daemon's counters and status (what `imagefs
status` prints), an inbox folder its recent publishes, and every folder the caller's
last refusal there (refusals.py). Changes to images are gestures (gestures.py), changes
to inbox files go to the spool; both ask access.py first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from imagefs import xattrs
from imagefs.access import Policy, Who
from imagefs.errors import InvalidValue, NoSuchAttribute, NotPermitted, UnsupportedAttribute
from imagefs.gestures import Gestures
from imagefs.inbox import Inbox
from imagefs.namespace import FolderNode, ImageNode, InboxNode, Node
from imagefs.records import json_text
from imagefs.refusals import Refusals

GLANCE = xattrs.GLANCE_PREFIX


class Metadata:
    def __init__(self, policy: Policy, inbox: Inbox, gestures: Gestures,
                 stats: Callable[[], dict[str, Any]], status: Callable[[], dict[str, Any]],
                 refusals: Refusals | None = None) -> None:
        self.policy = policy
        self.inbox = inbox
        self.gestures = gestures
        self._stats = stats
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

    def _daemon(self, who: Who, node: Node) -> dict[str, Callable[[], dict[str, Any]]]:
        """The root's counters and status, computed only when read.

        The counters say how many images there are, the status names recent refusals
        of every caller: admins only.
        """
        if not isinstance(node, FolderNode) or node.path or \
                not (who.admin or not self.policy.caller_dependent()):
            return {}
        return {xattrs.STATS: self._stats, xattrs.DAEMON: self._status}

    def get(self, who: Who, node: Node, key: str) -> str:
        daemon = self._daemon(who, node).get(key)
        if daemon is not None:
            return json.dumps(daemon(), sort_keys=True)
        value = self.items(who, node).get(key)
        if value is None:
            raise NoSuchAttribute(f"{key} is not set")
        return value

    async def set(self, who: Who, node: Node, key: str, value: bytes) -> None:
        text = _text(value)
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

