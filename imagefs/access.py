"""Who sees what. One policy object answers every visibility question for a caller.

Until per-caller access control lands, OpenPolicy lets every caller see every image;
the namespace already asks per caller, so a real policy drops in without changing it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

from imagefs.records import ImageRecord


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    pid: int


class AccessPolicy(Protocol):
    def view_key(self, caller: Caller) -> Hashable:
        """Callers with equal keys see exactly the same namespace (listing caches)."""

    def caller_dependent(self) -> bool:
        """True if different callers may see different things (kernel caches off)."""

    def projects(self, caller: Caller, known: Iterable[str]) -> set[str]:
        """Projects shown under projects/ for this caller."""

    def can_list(self, caller: Caller, image: ImageRecord) -> bool:
        """Glance's list rule: may this image appear in the caller's folder listings?"""

    def can_show(self, caller: Caller, image: ImageRecord) -> bool:
        """Glance's show rule: may the caller look it up by id and read it?"""


class OpenPolicy:
    """Everyone is an admin: every image visible to every caller."""

    def view_key(self, caller: Caller) -> Hashable:
        return "all"

    def caller_dependent(self) -> bool:
        return False

    def projects(self, caller: Caller, known: Iterable[str]) -> set[str]:
        return set(known)

    def can_list(self, caller: Caller, image: ImageRecord) -> bool:
        return True

    def can_show(self, caller: Caller, image: ImageRecord) -> bool:
        return True
