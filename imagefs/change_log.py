"""The catalog's change log, so a host's refresh costs O(changes), not O(catalog).

Every manifest write or delete, by any host or CLI, appends one small entry; now and
then a host compacts the catalog into a snapshot, which new hosts start from:

  changes/<seq>.msgpack     {"id": image id, "etag": the manifest's new etag ("" once
                             it is deleted), "catalog": the store's catalog id, "at": µs}
  snapshots/<seq>.msgpack   zlib(msgpack): the whole catalog as of entry <seq>

`<seq>` is 16 decimal digits, so key order is log order. Sequence numbers are dense:
a writer claims `head + 1` with a create-if-absent put, and on a conflict looks at the
new head and tries the next one, so two writers never share a number and an entry
exists only once every earlier one does. A reader that applied entry N lists only the
keys after N: an idle refresh is one LIST that returns nothing, at any catalog size.
A hole after N means entries were trimmed while the reader was away; it then starts
from the newest snapshot instead.

The log is a fast path, not the truth. A writer that dies between its manifest write
and its entry, or a store that ignores If-None-Match (two writers may then overwrite
one entry), leaves a change that only a full listing of the manifests finds; daemons
list every manifest now and then for that (`full_refresh_interval`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib

import msgpack

from imagefs.errors import ManifestDamaged, ObjectChanged, ObjectNotFound, StoreUntrusted
from imagefs.parallel import parallel
from imagefs.records import now_us
from imagefs.retry import Backoff
from imagefs.store_identity import StoreIdentity
from imagefs.stores import Store

log = logging.getLogger(__name__)
CHANGES_PREFIX = "changes/"
SNAPSHOTS_PREFIX = "snapshots/"
_SUFFIX = ".msgpack"
_DIGITS = 16
_SNAPSHOT_FORMAT = 1
_APPEND_ATTEMPTS = 50  # contention resolves a round at a time: one writer wins each
_APPEND_BACKOFF = Backoff(first=0.005, most=0.25)
SNAPSHOT_EVERY = 1000  # entries between snapshots
KEEP_SNAPSHOTS = 2
RETENTION = 86400.0  # entries older than the older kept snapshot stay this long (s)


def change_key(seq: int) -> str:
    return f"{CHANGES_PREFIX}{seq:0{_DIGITS}d}{_SUFFIX}"


def snapshot_key(seq: int) -> str:
    return f"{SNAPSHOTS_PREFIX}{seq:0{_DIGITS}d}{_SUFFIX}"


def seq_of(key: str, prefix: str) -> int | None:
    """The sequence number a log or snapshot key names; None for anything else."""
    name = key[len(prefix):] if key.startswith(prefix) else ""
    digits = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else ""
    return int(digits) if len(digits) == _DIGITS and digits.isdigit() else None


@dataclasses.dataclass(frozen=True)
class Entry:
    seq: int
    image_id: str
    etag: str  # of the manifest as this change left it; "" if it was deleted


@dataclasses.dataclass(frozen=True)
class Snapshot:
    seq: int
    images: dict[str, tuple[str, bytes]]  # image id -> (manifest etag, encoded manifest)
    catalog: str | None = None  # the store's catalog id when it was written


class ChangeLog:
    def __init__(self, store: Store, identity: StoreIdentity) -> None:
        self.store = store
        self.identity = identity
        # An entry known to exist (the newest this process saw), so finding the head
        # lists only what came after it. Entries that exist are never trimmed before
        # newer ones, so the head is never behind it.
        self._hint: int | None = None

    # -- writing ---------------------------------------------------------------------

    def append(self, image_id: str, etag: str) -> int:
        """Record that `image_id`'s manifest changed (etag "" = deleted); its number."""
        self.identity.ensure_for_write()
        body = msgpack.packb({"id": image_id, "etag": etag, "at": now_us(),
                              "catalog": self.identity.expected})
        after = self._hint if self._hint is not None else self.newest_snapshot() or 0
        for attempt in range(_APPEND_ATTEMPTS):
            seq = self.head(after) + 1
            try:
                self.store.put(change_key(seq), body, if_absent=True)
                self._hint = seq
                return seq
            except ObjectChanged:  # another writer took that number a moment ago
                after = seq
                time.sleep(_APPEND_BACKOFF.delay(attempt))
        raise ObjectChanged(f"{self.store.url}: the change log is too busy to append to")

    def head(self, after: int = 0) -> int:
        """The newest entry's number, looking only past entry `after` (which exists)."""
        newest = after
        for info in self.store.list(CHANGES_PREFIX, start_after=change_key(after)):
            newest = max(newest, seq_of(info.key, CHANGES_PREFIX) or 0)
        return newest

    # -- reading ---------------------------------------------------------------------

    def since(self, position: int) -> list[Entry] | None:
        """Entries after `position`, oldest first; None if the log cannot be followed
        from there (entries were trimmed meanwhile, or the log is gone)."""
        # Listing from the entry at `position` itself, which exists unless trimmed (the
        # newest entry never is): an empty answer means the log is gone, not "idle".
        after = change_key(position - 1) if position else None
        seqs = sorted(s for s in (seq_of(i.key, CHANGES_PREFIX) for i in self.store.list(
            CHANGES_PREFIX, start_after=after)) if s is not None)
        if position and not seqs:
            log.warning("%s: the change log has lost entry %d and everything after it (is "
                        "the share mounted, the bucket right?)", self.store.url, position)
            return None
        seqs = [s for s in seqs if s > position]
        if seqs != list(range(position + 1, position + 1 + len(seqs))):
            return None
        try:
            entries = parallel(self._entry, seqs)
        except ObjectNotFound:  # trimmed between the listing and the read
            return None
        if seqs:
            self._hint = seqs[-1]
        return [entries[s] for s in seqs]

    def _entry(self, seq: int) -> Entry:
        raw = self.store.get(change_key(seq))
        try:
            doc = msgpack.unpackb(raw)
            entry = Entry(seq, str(doc["id"]), str(doc["etag"]))
            catalog = doc.get("catalog")
        except Exception as exc:
            raise ManifestDamaged(f"{self.store.url}: change log entry {seq} is damaged "
                                  f"({exc})") from None
        expected = self.identity.expected
        if catalog and expected and catalog != expected:
            raise StoreUntrusted(f"{self.store.url}: change log entry {seq} belongs to "
                                 f"catalog {catalog}, not {expected}")
        return entry

    # -- snapshots -------------------------------------------------------------------

    def snapshots(self) -> list[int]:
        return sorted(s for s in (seq_of(i.key, SNAPSHOTS_PREFIX)
                                  for i in self.store.list(SNAPSHOTS_PREFIX)) if s is not None)

    def newest_snapshot(self) -> int | None:
        found = self.snapshots()
        return found[-1] if found else None

    def load_snapshot(self, seq: int) -> Snapshot:
        raw = self.store.get(snapshot_key(seq))
        try:
            doc = msgpack.unpackb(zlib.decompress(raw))
            if doc["format"] != _SNAPSHOT_FORMAT or doc["seq"] != seq:
                raise ValueError(f"format {doc['format']!r}, seq {doc['seq']!r}")
            images = {str(i): (str(etag), bytes(m)) for i, etag, m in doc["images"]}
            catalog = doc.get("catalog")
        except Exception as exc:
            raise ManifestDamaged(f"{self.store.url}: catalog snapshot {seq} is damaged "
                                  f"({exc})") from None
        return Snapshot(seq, images, str(catalog) if catalog else None)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """Publish a compacted catalog (first writer of a number wins), then trim."""
        doc = {"format": _SNAPSHOT_FORMAT, "seq": snapshot.seq, "at": now_us(),
               "catalog": snapshot.catalog or self.identity.expected,
               "images": [[i, etag, m] for i, (etag, m) in sorted(snapshot.images.items())]}
        try:
            self.store.put(snapshot_key(snapshot.seq), zlib.compress(msgpack.packb(doc), 1),
                           if_absent=True)
        except ObjectChanged:
            pass
        log.info("wrote catalog snapshot %d (%d images)", snapshot.seq, len(snapshot.images))
        self.trim()

    def trim(self) -> int:
        """Drop snapshots beyond the newest few, and entries they cover once old enough.

        An entry goes only when the older kept snapshot covers it and it is older than
        RETENTION, so hosts away for less than that catch up from the log itself.
        """
        kept = self.snapshots()
        removed = 0
        for seq in kept[:-KEEP_SNAPSHOTS]:
            self.store.delete(snapshot_key(seq))
            removed += 1
        if len(kept) < KEEP_SNAPSHOTS:
            return removed
        covered = kept[-KEEP_SNAPSHOTS]
        cutoff = time.time() - RETENTION
        for info in self.store.list(CHANGES_PREFIX):
            number = seq_of(info.key, CHANGES_PREFIX)
            if number is None or number > covered:
                break
            if info.modified >= cutoff:
                break  # entries are in order: the rest are newer still
            self.store.delete(info.key)
            removed += 1
        return removed


