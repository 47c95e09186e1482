"""Cache control: pinned (golden) images kept whole in the chunk cache, drops, status.

A pin is a row of the cache's `pins` table (cache.py): eviction skips every chunk of a
pinned image, so the image's bytes count against the cap for as long as it is pinned,
and the row survives remounts. Pinned images together may hold at most PIN_SHARE of the
cap: the rest stays for everything else the host reads, which caches and evicts as
before (eviction frees a tenth of that room at a time).

A pin returns once every chunk of the image is in LMDB and synced to disk, so it also
survives a crash. If the store fails part-way the image stays pinned and the keeper
(run every refresh_interval) fetches what is missing once the store answers; the
keeper also refills chunks dropped as damaged, replaces chunks of an old chunk size
after a config change, and drops the pins of images purged from the catalog.

Who may pin, unpin and drop: admins (without an [access] table: root and the mounting
user), as access.py's `check_admin` says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from imagefs import manifest as mf
from imagefs.access import Policy, Who
from imagefs.cache import ChunkCache, Pin, image_prefix
from imagefs.config import format_size
from imagefs.errors import CacheFull, ImagefsError, InvalidValue, NotPermitted
from imagefs.handles import CACHE_WRITE_WAIT
from imagefs.reader import ImageReader

log = logging.getLogger(__name__)
PIN_SHARE = 0.8  # of the cap, at most, for pinned images together
ACTIONS = ("pin", "unpin", "drop")  # what `user.imagefs.cache` of an image can be set to
_FILL_PARALLEL = 4  # chunks of one image fetched at once
_FILL_PASSES = 3  # a chunk whose cache write failed is fetched again, this often


def _prefix(manifest: mf.Manifest) -> bytes:
    return image_prefix(manifest.record.id, manifest.record.os_hash_value or "")


class CacheControl:
    def __init__(self, cache: ChunkCache, reader: ImageReader, policy: Policy,
                 images: Callable[[], dict[str, mf.Manifest]]) -> None:
        self.cache = cache
        self.reader = reader
        self.policy = policy
        self._images = images
        self._pinning = trio.Lock()  # the room check and the pin it allows, as one step
        self._filling: dict[str, trio.Lock] = {}  # one fill of an image at a time

    @property
    def limit(self) -> int:
        return int(self.cache.cap * PIN_SHARE)

    # -- what getfattr shows (blocking: run in a thread) --------------------------------

    def image_state(self, manifest: mf.Manifest) -> dict[str, Any]:
        """One image: its size, the bytes of it cached, whether it is pinned."""
        return {"id": manifest.record.id, "size": manifest.record.size or 0,
                "cached_bytes": sum(self.cache.chunks(_prefix(manifest)).values()),
                "pinned": manifest.record.id in self.cache.pins()}

    def status(self) -> dict[str, Any]:
        """The whole cache: every image with cached bytes or a pin, and the totals."""
        usage = self.cache.usage()
        pins = self.cache.pins()
        images: list[dict[str, Any]] = []
        for image_id, manifest in self._images().items():
            cached = usage.pop(_prefix(manifest), 0)
            if cached or image_id in pins:
                record = manifest.record
                images.append({"id": image_id, "name": record.name, "owner": record.owner,
                               "size": record.size or 0, "cached_bytes": cached,
                               "pinned": image_id in pins})
        images.sort(key=lambda i: (not i["pinned"], -i["cached_bytes"], i["id"]))
        return {"cap": self.cache.cap, "cache_bytes": self.cache.total_bytes(),
                "pinned_bytes": sum(pin.size for pin in pins.values()),
                "pin_limit": self.limit, "images": images,
                # Chunks of images no longer in the catalog: they age out like any others.
                "other_bytes": sum(usage.values())}

    # -- what setfattr asks -------------------------------------------------------------

    async def change(self, who: Who, manifest: mf.Manifest, action: str) -> None:
        if action not in ACTIONS:
            raise InvalidValue(f"{action!r}: user.imagefs.cache of an image is set to "
                               f"{', '.join(ACTIONS)}")
        image_id = manifest.record.id
        self.policy.check_admin(who, f"{action} image {image_id} in the cache")
        if action == "pin":
            await self.pin(manifest)
        elif action == "unpin":
            if await self.reader.write_cache(self.cache.unpin, image_id):
                log.info("image %s unpinned by %s: its chunks are evictable again", image_id,
                         who)
        else:
            await self.drop(manifest)
            log.info("image %s dropped from the cache by %s", image_id, who)

    async def pin(self, manifest: mf.Manifest) -> None:
        """Pin the image if the room allows, then fetch and cache all of it."""
        record = manifest.record
        async with self._pinning:
            pins = await trio.to_thread.run_sync(self.cache.pins)
            if record.id not in pins:
                others = sum(pin.size for pin in pins.values())
                size = record.size or 0
                if others + size > self.limit:
                    raise CacheFull(
                        f"cannot pin image {record.id} ({format_size(size)}): pins may take "
                        f"{format_size(self.limit)} ({PIN_SHARE:.0%} of the "
                        f"{format_size(self.cache.cap)} cache_size) and only "
                        f"{format_size(max(self.limit - others, 0))} of that is left; unpin "
                        "others or raise cache_size")
                await self.reader.write_cache(self.cache.pin, record.id, _prefix(manifest),
                                              size)
                log.info("image %s pinned (%d bytes)", record.id, size)
        try:
            await self._fill(manifest)
        except ImagefsError as exc:
            raise type(exc)(f"{exc}; it stays pinned, and the mount fetches the rest once "
                            "the store answers") from None
        await trio.to_thread.run_sync(self.cache.env.sync, True)

    async def drop(self, manifest: mf.Manifest) -> None:
        """Evict the image's chunks now (and its blocks in memory); pinned images refuse."""
        record = manifest.record
        if record.id in await trio.to_thread.run_sync(self.cache.pins):
            raise NotPermitted(f"image {record.id} is pinned; unpin it first "
                               "(imagefs cache unpin FILE)")
        prefix = _prefix(manifest)[:16]  # the image id: chunks of every chunk size
        keys = list(await trio.to_thread.run_sync(self.cache.chunks, prefix))
        await self.reader.write_cache(self.cache.discard_all, keys)
        self.reader.forget(prefix)

    # -- the keeper ---------------------------------------------------------------------

    async def keep(self) -> None:
        """Drop the pins of purged images; fetch what the others are missing."""
        images = self._images()
        failed: ImagefsError | None = None
        pins = await self._fit(await trio.to_thread.run_sync(self.cache.pins))
        for image_id in pins:
            manifest = images.get(image_id)
            if manifest is None:
                await self.reader.write_cache(self.cache.unpin, image_id)
                log.info("image %s was purged from the catalog; its pin is dropped (its "
                         "chunks age out of the cache like any others)", image_id)
                continue
            try:
                await self._fill(manifest)
            except ImagefsError as exc:
                failed = exc
        if failed is not None:
            raise failed

    async def _fit(self, pins: dict[str, Pin]) -> dict[str, Pin]:
        """cache_size was lowered under pins made before: the newest go until the rest fit
        (the cap is hard; a pin is a wish the cap must allow)."""
        kept = dict(pins)
        for image_id, _pin in sorted(pins.items(), key=lambda item: -item[1].since_us):
            if sum(pin.size for pin in kept.values()) <= self.limit:
                break
            del kept[image_id]
            await self.reader.write_cache(self.cache.unpin, image_id)
            log.warning("image %s unpinned: the pinned images took more than the %s pins may "
                        "take (%.0f%% of the %s cache_size); raise cache_size and pin it "
                        "again", image_id, format_size(self.limit), PIN_SHARE * 100,
                        format_size(self.cache.cap))
        return kept

    async def _fill(self, manifest: mf.Manifest) -> None:
        """Get every chunk of a pinned image into LMDB; raise if some cannot be."""
        image_id = manifest.record.id
        async with self._filling.setdefault(image_id, trio.Lock()):
            for _attempt in range(_FILL_PASSES):
                missing = await self._missing(manifest)
                if not missing:
                    return
                log.info("pinned image %s: fetching the %d chunks the cache lacks", image_id,
                         len(missing))
                failures = await self._fetch(manifest, missing)
                with trio.move_on_after(CACHE_WRITE_WAIT):
                    await self.reader.drain()  # fetched is not cached yet: wait for that
                if failures:
                    raise type(failures[0])(f"image {image_id}: {len(missing)} chunks not "
                                            f"cached yet: {failures[0]}")
            missing = await self._missing(manifest)
            if missing:
                raise ImagefsError(f"image {image_id}: {len(missing)} chunks could not be "
                                   "written to the cache (see the log)")

    async def _fetch(self, manifest: mf.Manifest, chunks: list[int]) -> list[ImagefsError]:
        """Load the chunks, a few at a time, as reads would; the failures. The first one
        ends the pass: a store that failed once would make each chunk wait its deadline."""
        geo = self.reader.geometry(manifest)
        todo = iter(chunks)
        failures: list[ImagefsError] = []

        async def worker() -> None:
            for chunk in todo:
                if failures:
                    return
                try:
                    await self.reader.cache_chunk(geo, chunk)
                except ImagefsError as exc:
                    failures.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(min(_FILL_PARALLEL, len(chunks))):
                nursery.start_soon(worker)
        return failures

    async def _missing(self, manifest: mf.Manifest) -> list[int]:
        """Chunk numbers of the image not in the cache; chunks of another chunk size (the
        config changed) are dropped, since a pin would keep them forever."""
        geo = self.reader.geometry(manifest)
        expected = {geo.key(c): c for c in range(-(-geo.size // geo.chunk))}
        cached = await trio.to_thread.run_sync(self.cache.chunks, _prefix(manifest))
        stale = [key for key in cached if key not in expected]
        if stale:
            log.info("pinned image %s: dropping %d cached chunks of another chunk size",
                     manifest.record.id, len(stale))
            await self.reader.write_cache(self.cache.discard_all, stale)
        return [c for key, c in expected.items() if key not in cached]
