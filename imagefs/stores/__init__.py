"""Store URLs -> store objects. `file:///dir` and `s3://bucket/prefix`."""

from __future__ import annotations

from urllib.parse import urlparse

from imagefs.config import S3Settings
from imagefs.errors import InvalidValue
from imagefs.stores.base import ObjectInfo, ObjectWriter, Store

__all__ = ["ObjectInfo", "ObjectWriter", "Store", "open_store"]


def open_store(url: str, s3: S3Settings | None = None, timeout: float = 60.0) -> Store:
    """Open the store at `url`; raises InvalidValue for a URL we cannot serve.

    `timeout` bounds each call to a network store, retries included.
    """
    if not url:
        raise InvalidValue("no store given: pass --store file:///DIR or s3://BUCKET/PREFIX")
    if url.startswith("/"):
        url = "file://" + url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from imagefs.stores.file import FileStore
        if parsed.netloc not in ("", "localhost"):
            raise InvalidValue(f"invalid file store URL {url!r}: use file:///absolute/path")
        if not parsed.path.startswith("/"):
            raise InvalidValue(f"invalid file store URL {url!r}: the path must be absolute")
        return FileStore(parsed.path)
    if parsed.scheme == "s3":
        from imagefs.stores.s3 import S3Store
        if not parsed.netloc:
            raise InvalidValue(f"invalid S3 store URL {url!r}: use s3://BUCKET[/PREFIX]")
        return S3Store(parsed.netloc, parsed.path.strip("/"), s3 or S3Settings(), timeout)
    raise InvalidValue(f"unknown store scheme {parsed.scheme or '(none)'!r} in {url!r}: "
                       "use file:///DIR or s3://BUCKET/PREFIX")
