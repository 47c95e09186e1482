"""Who sees what, and who may change what: every access rule of the mount, in one file.

A FUSE request carries a uid; `identify` turns it into a `Who`: the projects the caller
belongs to and its roles, from the `[access]` table of the config (user names and
@group names; the user's groups come from the user and group databases). The rules are
Glance's defaults (docs/access.md):

| image                      | listed to                                  | openable by id by |
|----------------------------|--------------------------------------------|-------------------|
| public                     | everyone                                   | everyone          |
| community                  | everyone, only in community/ and owner's   | everyone          |
| shared, member accepted    | owner, the member                          | owner, the member |
| shared, member pending     | owner; the member only in invitations/     | owner, the member |
| shared, member rejected    | owner                                      | owner, the member |
| private                    | owner                                      | owner             |

Admins see and manage everything; readers (a hypervisor's qemu) open any image by id and
list nothing. Hidden things answer ENOENT, as Glance answers 404; refused changes answer
EACCES (Glance's 403) and log the rule that refused them.
"""

from __future__ import annotations

import grp
import os
import pwd
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from imagefs.errors import AccessDenied
from imagefs.records import ImageRecord


VISIBLE_STATUSES = ("active", "deactivated")  # what a folder or a lookup can show
_IDENTITY_TTL = 10.0  # seconds a uid's groups are remembered (the group database is slow)


@dataclass(frozen=True)
class Caller:
    """Who sent a FUSE request, as the kernel says."""

    uid: int
    gid: int
    pid: int


@dataclass(frozen=True)
class Who:
    """A caller as the rules see it. Callers with equal `view`s see the same namespace."""

    uid: int
    name: str
    projects: frozenset[str] = frozenset()
    admin: bool = False
    reader: bool = False

    @property
    def view(self) -> tuple[frozenset[str], bool, bool]:
        return self.projects, self.admin, self.reader

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid})"


@dataclass
class AccessSettings:
    """The `[access]` table. Entries are user names or @group names."""

    admins: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    projects: dict[str, list[str]] = field(default_factory=dict)
    # What a user mapped to nothing gets: "public" (public images and community images,
    # as any project would) or "none" (nothing at all).
    anonymous: str = "public"


class Policy(Protocol):
    def identify(self, caller: Caller) -> Who:
        """Blocking on a cache miss (the user and group databases may be LDAP)."""

    def identified(self, caller: Caller) -> Who | None:
        """The caller's Who if it is known without asking the databases, else None."""

    def caller_dependent(self) -> bool:
        """True if different callers may see different things (kernel caches off)."""

    def can_see(self, who: Who, image: ImageRecord) -> bool:
        """Glance's show rule: may the caller look it up by id, stat it, read its xattrs?"""

    def listed(self, who: Who, image: ImageRecord, folder: str) -> bool:
        """May the image appear in a listing of `folder` (by-id, tags, public, community,
        project)? The namespace has already chosen the images the folder holds."""

    def enters_project(self, who: Who, project: str) -> bool:
        """May the caller see projects/<project>/ and inbox/<project>/?"""

    def project_names(self, who: Who, known: Iterable[str]) -> set[str]:
        """What projects/ and inbox/ list for the caller."""

    def everyone_sees(self, image: ImageRecord) -> bool:
        """True if every caller may look the image up by id: the kernel may cache it."""

    def members_shown(self, who: Who, image: ImageRecord) -> dict[str, str]:
        """The image's members as the caller may see them (owner: all; member: its own)."""

    def check_open(self, who: Who, image: ImageRecord) -> None: ...

    def check_change(self, who: Who, image: ImageRecord, what: str) -> None: ...

    def check_visibility(self, who: Who, image: ImageRecord, visibility: str) -> None: ...

    def check_member_status(self, who: Who, image: ImageRecord, project: str) -> None: ...

    def check_inbox(self, who: Who, project: str) -> None: ...

    def check_upload_field(self, who: Who, project: str, key: str, value: object) -> None:
        """A field an inbox file will be published with (public needs an admin)."""

    def check_admin(self, who: Who, what: str) -> None: ...


def _refuse(who: Who, what: str, rule: str) -> AccessDenied:
    """The refusal; the FUSE edge logs its message, which names the rule, once."""
    return AccessDenied(f"{who} may not {what}: {rule}")


class OpenPolicy:
    """No [access] table: every caller sees everything; root and the mounting user change.

    This was imagefs's behaviour before access control, and stays the default so that
    single-user mounts keep working unchanged.
    """

    def __init__(self, mount_uid: int) -> None:
        self._changers = {0, mount_uid}

    def identify(self, caller: Caller) -> Who:
        return Who(caller.uid, f"uid {caller.uid}", admin=caller.uid in self._changers)

    def identified(self, caller: Caller) -> Who | None:
        return self.identify(caller)

    def caller_dependent(self) -> bool:
        return False

    def can_see(self, who: Who, image: ImageRecord) -> bool:
        return image.status in VISIBLE_STATUSES

    def listed(self, who: Who, image: ImageRecord, folder: str) -> bool:
        return image.status in VISIBLE_STATUSES and not image.os_hidden

    def enters_project(self, who: Who, project: str) -> bool:
        return True

    def project_names(self, who: Who, known: Iterable[str]) -> set[str]:
        return set(known)

    def everyone_sees(self, image: ImageRecord) -> bool:
        return True

    def members_shown(self, who: Who, image: ImageRecord) -> dict[str, str]:
        return dict(image.members)

    def check_open(self, who: Who, image: ImageRecord) -> None:
        return None

    def _changer(self, who: Who, what: str) -> None:
        if not who.admin:
            raise _refuse(who, what, "without an [access] table only root and the mounting "
                                     "user change anything")

    def check_change(self, who: Who, image: ImageRecord, what: str) -> None:
        self._changer(who, what)

    def check_visibility(self, who: Who, image: ImageRecord, visibility: str) -> None:
        self._changer(who, f"make image {image.id} {visibility}")

    def check_member_status(self, who: Who, image: ImageRecord, project: str) -> None:
        self._changer(who, f"answer the share of image {image.id} for {project}")

    def check_inbox(self, who: Who, project: str) -> None:
        self._changer(who, f"upload into inbox/{project}")

    def check_upload_field(self, who: Who, project: str, key: str, value: object) -> None:
        self.check_inbox(who, project)

    def check_admin(self, who: Who, what: str) -> None:
        self._changer(who, what)


class _Directory:
    """uid -> (name, groups), from the user and group databases, remembered briefly."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[float, str, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def cached(self, uid: int) -> tuple[str, frozenset[str]] | None:
        with self._lock:
            cached = self._cache.get(uid)
        if cached is None or time.monotonic() - cached[0] >= _IDENTITY_TTL:
            return None
        return cached[1], cached[2]

    def lookup(self, uid: int) -> tuple[str, frozenset[str]]:
        """The user's name and the names of its groups, from the databases alone.

        The request's own gid is not trusted: a setgid program would otherwise keep a
        user in a group (and its projects) after the user was removed from it.
        """
        cached = self.cached(uid)
        if cached is not None:
            return cached
        now = time.monotonic()
        try:
            user = pwd.getpwuid(uid)
            name, gids = user.pw_name, set(os.getgrouplist(user.pw_name, user.pw_gid))
        except KeyError:  # a uid without a passwd entry belongs to nothing
            name, gids = f"uid {uid}", set()
        names = set()
        for group_id in gids:
            try:
                names.add(grp.getgrgid(group_id).gr_name)
            except KeyError:
                continue
        groups = frozenset(names)
        with self._lock:
            self._cache[uid] = (now, name, groups)
        return name, groups


def _matches(entries: Iterable[str], name: str, groups: frozenset[str]) -> bool:
    return any(e[1:] in groups if e.startswith("@") else e == name for e in entries)


class GlancePolicy:
    """Glance's visibility, membership and policy defaults, for users mapped by config."""

    def __init__(self, settings: AccessSettings) -> None:
        self.settings = settings
        self._directory = _Directory()

    def identify(self, caller: Caller) -> Who:
        return self._who(caller, *self._directory.lookup(caller.uid))

    def identified(self, caller: Caller) -> Who | None:
        known = self._directory.cached(caller.uid)
        return self._who(caller, *known) if known is not None else None

    def _who(self, caller: Caller, name: str, groups: frozenset[str]) -> Who:
        s = self.settings
        projects = frozenset(p for p, members in s.projects.items()
                             if _matches(members, name, groups))
        return Who(caller.uid, name, projects,
                   admin=caller.uid == 0 or _matches(s.admins, name, groups),
                   reader=_matches(s.readers, name, groups))

    def caller_dependent(self) -> bool:
        return True

    # -- seeing -------------------------------------------------------------------------

    def _anonymous(self, who: Who) -> bool:
        return not (who.projects or who.admin or who.reader)

    def _member_of(self, who: Who, image: ImageRecord) -> str | None:
        """The member status of the caller's project, while the image is shared."""
        if image.visibility != "shared":
            return None
        statuses = [image.members[p] for p in who.projects if p in image.members]
        for status in ("accepted", "pending", "rejected"):
            if status in statuses:
                return status
        return None

    def can_see(self, who: Who, image: ImageRecord) -> bool:
        if image.status not in VISIBLE_STATUSES:
            return False
        if who.admin or who.reader or image.owner in who.projects:
            return True
        if image.visibility in ("public", "community"):
            return not (self._anonymous(who) and self.settings.anonymous == "none")
        return self._member_of(who, image) is not None

    def listed(self, who: Who, image: ImageRecord, folder: str) -> bool:
        if image.status not in VISIBLE_STATUSES or image.os_hidden:
            return False
        if who.admin:
            return True
        if folder == "project":  # projects/<p>/...: enters_project decided
            return True
        if who.reader and not who.projects:  # a hypervisor opens by id and lists nothing
            return False
        if self._anonymous(who) and self.settings.anonymous == "none":
            return False
        if folder in ("public", "community"):
            return image.visibility == folder
        # by-id/ and tags/: Glance's image list.
        return (image.owner in who.projects or image.visibility == "public"
                or self._member_of(who, image) == "accepted")

    def enters_project(self, who: Who, project: str) -> bool:
        return who.admin or project in who.projects

    def project_names(self, who: Who, known: Iterable[str]) -> set[str]:
        if who.admin:
            return set(known) | set(self.settings.projects)
        return set(who.projects)

    def everyone_sees(self, image: ImageRecord) -> bool:
        return (image.visibility in ("public", "community") and self.settings.anonymous != "none"
                and image.status in VISIBLE_STATUSES)

    def members_shown(self, who: Who, image: ImageRecord) -> dict[str, str]:
        if who.admin or image.owner in who.projects:
            return dict(image.members)
        return {p: s for p, s in image.members.items() if p in who.projects}

    # -- opening and changing -----------------------------------------------------------

    def check_open(self, who: Who, image: ImageRecord) -> None:
        if image.status == "deactivated" and not who.admin:
            raise _refuse(who, f"open image {image.id}", "a deactivated image opens for "
                                                         "admins only")

    def check_change(self, who: Who, image: ImageRecord, what: str) -> None:
        if not (who.admin or image.owner in who.projects):
            raise _refuse(who, what, f"only members of project {image.owner} (the owner) "
                                     f"and admins change image {image.id}")

    def check_visibility(self, who: Who, image: ImageRecord, visibility: str) -> None:
        if visibility == "public" and not who.admin:
            raise _refuse(who, f"make image {image.id} public", "publicizing an image is "
                                                                "for admins only")
        self.check_change(who, image, f"make image {image.id} {visibility}")

    def check_member_status(self, who: Who, image: ImageRecord, project: str) -> None:
        if not (who.admin or project in who.projects):
            raise _refuse(who, f"answer the share of image {image.id} for {project}",
                          f"only members of {project} (the invited project) and admins "
                          "accept or reject a share")

    def check_inbox(self, who: Who, project: str) -> None:
        if not self.enters_project(who, project):
            raise _refuse(who, f"upload into inbox/{project}",
                          f"only members of {project} and admins upload there")

    def check_upload_field(self, who: Who, project: str, key: str, value: object) -> None:
        self.check_inbox(who, project)
        if key == "visibility" and value == "public" and not who.admin:
            raise _refuse(who, f"publish an upload into inbox/{project} as public",
                          "publicizing an image is for admins only")

    def check_admin(self, who: Who, what: str) -> None:
        if not who.admin:
            raise _refuse(who, what, "admins only")
