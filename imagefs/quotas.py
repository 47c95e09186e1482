"""Per-project quotas: how many images, how many stored bytes, how many staged bytes.

Configured as `[quotas.<project>]` tables (`[quotas."*"]` for every project without one).
Stored bytes count every image the project owns that still has data in the store
(active, deactivated, or deleted and not yet purged), as Glance counts them. What is
staged in the inbox counts against `staging` and, since it is about to be stored,
against `images` and `stored` too. Nothing already stored is ever touched: a quota only
refuses what would go over it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from imagefs.errors import QuotaExceeded
from imagefs.records import ImageRecord

_COUNTED = ("active", "deactivated", "pending_delete", "saving")


@dataclass(frozen=True)
class Quota:
    images: int | None = None
    stored: int | None = None  # bytes
    staging: int | None = None  # bytes


@dataclass(frozen=True)
class Usage:
    images: int = 0
    stored: int = 0
    staging: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.images + other.images, self.stored + other.stored,
                     self.staging + other.staging)


def stored_usage(images: Iterable[ImageRecord], project: str) -> Usage:
    """What the project's images in the catalog count against its quota."""
    mine = [i for i in images if i.owner == project and i.status in _COUNTED]
    return Usage(len(mine), sum(i.size or 0 for i in mine))


class Quotas:
    def __init__(self, table: dict[str, Quota]) -> None:
        self._table = dict(table)

    def update(self, table: dict[str, Quota]) -> None:
        """A reload: the new limits apply to what is written from now on."""
        self._table = dict(table)

    def of(self, project: str) -> Quota:
        return self._table.get(project) or self._table.get("*") or Quota()

    def limits(self, project: str) -> bool:
        """True if any quota applies to the project (else usage need not be computed)."""
        return self.of(project) != Quota()

    def check(self, project: str, usage: Usage, adding: Usage) -> None:
        """Raise QuotaExceeded (EDQUOT) if `usage` plus `adding` goes over a quota."""
        quota = self.of(project)
        for name, unit in (("images", "images"), ("stored", "bytes"), ("staging", "bytes")):
            limit, used, more = (getattr(quota, name), getattr(usage, name),
                                 getattr(adding, name))
            if limit is not None and more > 0 and used + more > limit:
                raise QuotaExceeded(
                    f"project {project} is over its {name} quota: {used} {unit} used, "
                    f"{more} more would pass the limit of {limit} ([quotas.{project}] "
                    f"{name} in the config)")
