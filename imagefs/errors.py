"""Domain exceptions, and the one table that maps them to errno at the FUSE edge."""

from __future__ import annotations

import errno


class ImagefsError(Exception):
    """Base of every error imagefs raises on purpose; the message is for an operator."""


class InvalidValue(ImagefsError, ValueError):
    """A field, property or option value that Glance would refuse."""


class ImageNotFound(ImagefsError):
    """No such name or id, or one the caller may not see (Glance's 404 either way)."""


class NotPermitted(ImagefsError):
    """A gesture the catalog refuses: deleting a protected image, renaming by-id/..."""


class ReadOnlyField(NotPermitted):
    """A field no one may set: computed (id, checksum, size...) or reserved by Glance."""


class AccessDenied(ImagefsError):
    """The access rules refuse the caller this (Glance's 403); the message names the rule."""


class NoSuchAttribute(ImagefsError):
    """An xattr that is not set (a null Glance field, an absent property)."""


class UnsupportedAttribute(ImagefsError):
    """An xattr outside the namespaces imagefs serves (user.glance., user.imagefs.)."""


class ReadOnly(ImagefsError):
    """Image data never changes, and files are only created in the inbox."""


class BadHandle(ImagefsError):
    """A file handle used for what it was not opened for (write on a read-only open)."""


class NameTaken(ImagefsError):
    """A rename would replace another image; imagefs never does that."""


class StoreError(ImagefsError):
    """The store answered, but not with what we need (missing object, bad manifest)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached, or keeps failing after retries."""


class StoreAccessDenied(StoreError):
    """Credentials are missing or wrong, or the bucket refuses us."""


class StoreNotFound(StoreError):
    """The store location (bucket, directory) does not exist."""


class ObjectNotFound(StoreError):
    """One object is missing from an otherwise reachable store."""


class ObjectChanged(StoreError):
    """A conditional write lost a race: someone else changed the object first."""


class StoreUntrusted(StoreError):
    """The store answers, but not as the catalog we know (empty, or another catalog)."""


class ManifestDamaged(StoreError):
    """A manifest or block table that does not decode or does not match."""


class ChunkCorrupted(ImagefsError):
    """Data did not match the hash recorded at upload; never returned to a reader."""


class UnsafeImage(InvalidValue):
    """The format inspector refused the data (backing file, data file, bad format...)."""


class StagingFull(ImagefsError):
    """The inbox's staging area (spool_size) is full."""


class QuotaExceeded(ImagefsError):
    """A project's quota (images, stored bytes, staging bytes) would be exceeded."""


class CacheFull(ImagefsError):
    """Pinning this would leave the cache too little room for everything else."""


# The one table: what a FUSE caller sees for each domain error (and its subclasses).
ERRNO: dict[type[ImagefsError], int] = {
    ImagefsError: errno.EIO,
    InvalidValue: errno.EINVAL,
    ImageNotFound: errno.ENOENT,
    NotPermitted: errno.EPERM,
    AccessDenied: errno.EACCES,
    NoSuchAttribute: errno.ENODATA,
    UnsupportedAttribute: errno.ENOTSUP,
    ReadOnly: errno.EROFS,
    BadHandle: errno.EBADF,
    NameTaken: errno.EEXIST,
    StoreError: errno.EIO,
    StoreAccessDenied: errno.EACCES,
    StoreNotFound: errno.ENOENT,
    ObjectChanged: errno.EAGAIN,
    ChunkCorrupted: errno.EIO,
    StagingFull: errno.ENOSPC,
    QuotaExceeded: errno.EDQUOT,
    CacheFull: errno.ENOSPC,
}


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE caller sees for `exc`; unknown failures are EIO."""
    for cls in type(exc).__mro__:
        if cls in ERRNO:
            return ERRNO[cls]  # type: ignore[index]
    return errno.EIO


def errno_name(exc: BaseException) -> str:
    """'EPERM': the errno a FUSE caller sees for `exc`, by name, for messages about it."""
    return errno.errorcode.get(errno_for(exc), "EIO")


def is_routine(exc: BaseException) -> bool:
    """No such name, no such xattr: what lookups answer all day, not a refusal."""
    return errno_for(exc) in (errno.ENOENT, errno.ENODATA)
