"""Which catalog a store holds: a marker object with a random id, written once.

An NFS share that is not mounted, or a bucket name typo, looks like an empty store.
"Absence is not evidence": a listing with no images only empties a catalog when the
store's marker says it is the same catalog, and a daemon that knows its store's id
never writes into a store that has lost its marker.
"""

from __future__ import annotations

import uuid

import msgpack

from imagefs.errors import ManifestDamaged, ObjectChanged, ObjectNotFound, StoreUntrusted
from imagefs.records import now_us
from imagefs.stores import Store

MARKER_KEY = "imagefs-catalog.msgpack"


class StoreIdentity:
    def __init__(self, store: Store, expected: str | None = None) -> None:
        """`expected`: the id this host last saw in the store (None: none known yet)."""
        self.store = store
        self.expected = expected
        self._confirmed = False

    def read(self) -> str | None:
        """The store's catalog id, or None if it has no marker."""
        try:
            raw = self.store.get(MARKER_KEY)
        except ObjectNotFound:
            return None
        try:
            found = msgpack.unpackb(raw)["id"]
            return str(uuid.UUID(found))
        except Exception as exc:
            raise ManifestDamaged(f"{self.store.url}: {MARKER_KEY} is damaged ({exc})") \
                from None

    def stamp(self) -> str:
        """Write the marker (the expected id, else a new one); return what the store has."""
        marker = msgpack.packb({"id": self.expected or str(uuid.uuid4()),
                                "created_at": now_us()})
        try:
            self.store.put(MARKER_KEY, marker, if_absent=True)
        except ObjectChanged:  # another writer stamped it first: theirs stands
            pass
        found = self.read()
        if found is None:
            raise StoreUntrusted(f"{self.store.url}: {MARKER_KEY} vanished right after "
                                 "it was written")
        return found

    def check(self, found: str) -> None:
        if self.expected is not None and found != self.expected:
            raise StoreUntrusted(
                f"{self.store.url} now holds another catalog (id {found}; this host knew "
                f"{self.expected}); is the right share or bucket mounted? To adopt the new "
                "catalog, remove the cache dir and mount again")

    def ensure_for_write(self) -> None:
        """Before publishing: the store must be the catalog we know (stamped if new)."""
        if self._confirmed:
            return
        found = self.read()
        if found is None:
            if self.expected is not None:
                raise StoreUntrusted(
                    f"{self.store.url} has lost its {MARKER_KEY} (is the share mounted?); "
                    "nothing is written there until it is back")
            found = self.stamp()
        self.check(found)
        self.expected = found
        self._confirmed = True
