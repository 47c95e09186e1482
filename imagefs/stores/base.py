"""What every store offers: named immutable objects, ranged reads, atomic small puts."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    # Changes whenever the object is rewritten; lets a catalog refresh skip unchanged
    # manifests.
    etag: str
    modified: float = 0.0  # seconds since the epoch, as the store says


class ObjectWriter(abc.ABC):
    """A large object being written; invisible under its key until commit()."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard what was written; must not raise."""


class Store(abc.ABC):
    """A store is the source of truth. All calls block: run them in worker threads.

    Implementations raise imagefs.errors store exceptions: ObjectNotFound for a missing
    key, StoreNotFound / StoreAccessDenied for a missing or refused location, and
    StoreUnavailable once retries of temporary failures run out.
    """

    url: str

    @abc.abstractmethod
    def check(self) -> None:
        """Raise unless the store exists and answers us."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object and its etag, for a later put(..., if_match=etag)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """True if `key` is there; False only on the store's positive word that it is not."""

    @abc.abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Exactly `length` bytes from `start`, or StoreError if the object is shorter."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, if_match: str | None = None,
            if_absent: bool = False) -> str:
        """Write a small object atomically (readers see the old or the new, never half);
        returns the new version's etag, as list() and get_versioned() will show it.

        `if_match` writes only over the version with that etag, `if_absent` only where
        there is no object yet; otherwise ObjectChanged. A store that cannot enforce
        these says so in `conditional_writes`.
        """

    @property
    def conditional_writes(self) -> bool:
        """Whether put()'s conditions are enforced (else they are best effort)."""
        return True

    @abc.abstractmethod
    def open_writer(self, key: str) -> ObjectWriter: ...

    @abc.abstractmethod
    def list(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects under `prefix` in key order; only keys after `start_after` if given
        (so reading a log's tail costs one small request, however long the log)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    def remove_stale_temporaries(self, older_than: float) -> int:
        """Remove what writes cut short by a crash left behind, if the store keeps such
        things itself; returns how many. S3 leaves incomplete multipart uploads, which
        the bucket's lifecycle rule (AbortIncompleteMultipartUpload) removes."""
        return 0

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release connections."""
