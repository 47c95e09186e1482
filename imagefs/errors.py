"""Domain exceptions, and the one table that maps them to errno at the FUSE edge."""

from __future__ import annotations

import errno


class ImagefsError(Exception):
    """Base of every error imagefs raises on purpose; the message is for an operator."""

    errno = errno.EIO


class InvalidValue(ImagefsError, ValueError):
    """A field, property or option value that Glance would refuse."""

    errno = errno.EINVAL


class ImageNotFound(ImagefsError):
    errno = errno.ENOENT


class NotPermitted(ImagefsError):
    """A gesture the catalog refuses: deleting a protected image, renaming by-id/..."""

    errno = errno.EPERM


class ReadOnlyField(NotPermitted):
    """A field no one may set: computed (id, checksum, size...) or reserved by Glance."""


class NoSuchAttribute(ImagefsError):
    errno = errno.ENODATA


class NameTaken(ImagefsError):
    """A rename would replace another image; imagefs never does that."""

    errno = errno.EEXIST


class StoreError(ImagefsError):
    """The store answered, but not with what we need (missing object, bad manifest)."""

    errno = errno.EIO


class StoreUnavailable(StoreError):
    """The store cannot be reached, or keeps failing after retries."""


class StoreAccessDenied(StoreError):
    """Credentials are missing or wrong, or the bucket refuses us."""

    errno = errno.EACCES


class StoreNotFound(StoreError):
    """The store location (bucket, directory) does not exist."""

    errno = errno.ENOENT


class ObjectNotFound(StoreError):
    """One object is missing from an otherwise reachable store."""


class ObjectChanged(StoreError):
    """A conditional write lost a race: someone else changed the object first."""

    errno = errno.EAGAIN


class StoreUntrusted(StoreError):
    """The store answers, but not as the catalog we know (empty, or another catalog)."""


class ManifestDamaged(StoreError):
    """A manifest or block table that does not decode or does not match."""


class ChunkCorrupted(ImagefsError):
    """Data did not match the hash recorded at upload; never returned to a reader."""

    errno = errno.EIO


class UnsafeImage(InvalidValue):
    """The format inspector refused the data (backing file, data file, bad format...)."""


class QuotaExceeded(ImagefsError):
    """The inbox's staging area is full."""

    errno = errno.ENOSPC


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE caller sees for `exc`; unknown failures are EIO."""
    if isinstance(exc, ImagefsError):
        return exc.errno
    return errno.EIO
