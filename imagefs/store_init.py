"""`imagefs store init`: make a store's bucket or directory exist, and stamp its catalog.

A new bucket otherwise has to be made with another tool before the first upload, and
an unstamped store is only vouched for by its first write ("absence is not evidence",
store_identity.py); after init, a mount knows the catalog it serves from the start.
"""

from __future__ import annotations

from imagefs.errors import StoreAccessDenied, StoreNotFound
from imagefs.store_identity import StoreIdentity
from imagefs.stores import Store
from imagefs.stores.file import FileStore


def init_hint(url: str) -> str:
    """What error messages about a missing or unstamped store suggest."""
    return f"`imagefs store init --store {url}` creates and stamps it"


def init_store(store: Store) -> tuple[bool, str]:
    """Create the store's location if it is missing, then stamp its catalog marker.

    Returns whether the location was created, and the catalog id. Running it again is
    harmless: an existing store keeps its images and its marker.
    """
    created = False
    try:
        store.check()
    except StoreNotFound:
        _create(store)
        store.check()
        created = True
    return created, StoreIdentity(store).stamp()


def _create(store: Store) -> None:
    if isinstance(store, FileStore):
        try:
            store.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreAccessDenied(f"cannot create store directory {store.root}: "
                                    f"{exc.strerror}") from None
        return
    from imagefs.stores.s3 import S3Store  # boto3 only for an S3 store

    assert isinstance(store, S3Store)
    store.create_bucket()  # an S3 prefix needs no creating: the marker's key makes it
