"""Soak: readers, uploads and gestures at once, on a cache smaller than the working set.

The reliability issue's acceptance test. For a while (IMAGEFS_SOAK_SECONDS; 25 s, or
300 s per store with IMAGEFS_LONG=1) one mount serves 16 reader threads — half reading
whole images front to back in 1 MiB reads, half reading 4 KiB..256 KiB at random
offsets — while two uploaders copy new images into the inbox and a gesture thread sets
properties, renames, changes visibility and deletes. The cache cap is a quarter of the
working set and the memory cache small, so reads keep going through LMDB, eviction and
the store. Then:

* every byte read equals the byte uploaded, and no read failed: the store is healthy,
  so an EIO (or an ENOSPC from a full cache) is a bug, not bad luck;
* `cache_bytes` never exceeded `cache_cap` at any sample;
* the daemon's memory stayed bounded: malloc's bytes in use (from a probe thread in
  the daemon) under a bound and not growing over the second half, RSS under a bound
  that admits what glibc keeps in its heaps, and, on long runs, not growing either;
* the daemon still answers, its listings and the store's catalog match every gesture
  made, and it logged no error and no traceback (the `mounts` fixture checks that);
* a handle opened before an `rm` read on (semantics.md: "reads on to the end").

Readers are threads of this process (the daemon is another process; os.pread releases
the GIL) and read through `by-id/<id>`, so a rename or a visibility change never gets
in their way; a deleted image is read through the fd opened while it was listed. Each
pass drops the kernel's page cache of the file first, so reads reach the daemon.
The quick size runs against S3 only (the interesting store, and the 90 s budget); the
long size runs against file:// too.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import statistics
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import LONG, make_file, run_cli
from imagefs.naming import image_name

MiB = 1 << 20
KiB = 1 << 10

SECONDS = float(os.environ.get("IMAGEFS_SOAK_SECONDS") or (300 if LONG else 25))
BASE_SIZES_MIB = [16, 20, 24, 28, 32, 36, 40, 60]  # 256 MiB of images before any upload
CACHE_SIZE = 64 * MiB  # a quarter of the working set, which uploads only grow
MEMORY_CACHE = 16 * MiB
SEQUENTIAL_READERS = 8
RANDOM_READERS = 8
UPLOADERS = 2
PROJECT = "acme"
VISIBILITIES = ("private", "shared", "community", "public")

# Memory. Measured at HEAD (a6aeaf1) under this load, malloc's bytes in use stay at
# 30-110 MiB: about 30 MiB of interpreter, boto3 and catalog, the memory cache, and what
# is in flight. But glibc keeps what is freed in its heaps (its mmap threshold climbs
# past the 4 MiB chunk size, so chunk buffers stop going back to the kernel), and RssAnon
# climbs for a minute or two and settles at 400-620 MiB, 300-450 MiB of it free heap.
# So leaks are judged on malloc's own count, read by a probe thread in the daemon
# (mallinfo2), and RSS gets bounds that admit glibc's retention but not a leak.
#
# Over the second half, the median in use: the memory cache plus a fixed allowance.
IN_USE_MEDIAN_BOUND = MEMORY_CACHE + 96 * MiB
# The peak in use: everything the design lets the load hold at once — the memory cache
# (16 MiB), 16 store fetches of 4 MiB chunks each held twice while its pieces are joined
# (128 MiB), 8 chunks waiting for the cache writer and LMDB's dirty pages (36 MiB), two
# inbox streams with a 16 MiB part buffer and 8 MiB reads (~80 MiB), the baseline.
IN_USE_BOUND = 320 * MiB
IN_USE_GROWTH_BOUND = 32 * MiB  # median of the last quarter over that of the second
RSS_ANON_BOUND = 768 * MiB
RSS_BOUND = RSS_ANON_BOUND + 2 * CACHE_SIZE  # plus file-backed pages: LMDB's map
# RssAnon may wander once glibc's heaps have settled, not climb; before that (the quick
# size) it climbs anyway, so its growth is judged only on runs at least this long.
RSS_SETTLED = 150.0
RSS_GROWTH_BOUND = 96 * MiB
# Run in the daemon before it starts (Mount's prelude): every 0.5 s, malloc's bytes in
# use (heap and mmapped) and free in its heaps, to the file named by PROBE_PATH.
PROBE = """
import ctypes as _c, threading as _t, time as _time

def _soak_probe(path):
    class Info(_c.Structure):
        _fields_ = [(n, _c.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = _c.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        return
    libc.mallinfo2.restype = Info
    with open(path, "w", buffering=1) as out:
        while True:
            info = libc.mallinfo2()
            out.write(f"{_time.monotonic()} {info.uordblks + info.hblkhd} {info.fordblks}\\n")
            _time.sleep(0.5)

_t.Thread(target=_soak_probe, args=(PROBE_PATH,), name="soak-probe", daemon=True).start()
"""
JOIN_TIMEOUT = 60.0  # a worker still running this long after the stop is hung
UPLOAD_TIMEOUT = 60.0


@dataclass
class Image:
    id: str
    source: Path  # the bytes the image must read as
    size: int
    fd: int  # on by-id/<id>, opened while the image was listed: it survives rm
    src_fd: int
    name: str  # the image's name
    file_name: str  # its file name in projects/<p>/<visibility>/
    uploaded: bool
    visibility: str = "private"
    deleted: bool = False
    deleted_at: float = 0.0
    lost: bool = False  # deleted, and reading its old handle failed: readers leave it
    properties: dict[str, str] = field(default_factory=dict)


@dataclass
class Sample:
    t: float
    rss: int
    anon: int
    cache_bytes: int
    cache_cap: int


@dataclass
class Tally:
    reads: int = 0
    bytes_verified: int = 0
    sequential_passes: int = 0
    page_cache_drops: int = 0
    uploads: int = 0
    upload_seconds: list[float] = field(default_factory=list)
    gestures: dict[str, int] = field(default_factory=dict)
    by_id_lag: float = 0.0  # longest wait for by-id/<id> to vanish after an rm


class Soak:
    """One soak run: the image pool, the workers, the tallies and what went wrong."""

    def __init__(self, mount, work: Path,  # type: ignore[no-untyped-def]
                 seconds: float) -> None:
        self.mount = mount
        self.work = work  # sources of uploads are kept here, to compare reads with
        self.seconds = seconds
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.images: list[Image] = []
        self.tally = Tally()
        self.errors: list[str] = []
        self.mismatches: list[str] = []
        self.lost_after_rm: list[str] = []
        self.samples: list[Sample] = []
        self.malloc: list[tuple[float, int, int]] = []  # (t, bytes in use, free in heaps)
        self.stats_latency = 0.0
        self.started = self.elapsed = 0.0

    # -- the pool ---------------------------------------------------------------------

    def add(self, image_id: str, source: Path, name: str, file_name: str,
            uploaded: bool) -> Image:
        image = Image(image_id, source, source.stat().st_size,
                      os.open(self.mount / f"by-id/{image_id}", os.O_RDONLY),
                      os.open(source, os.O_RDONLY), name, file_name, uploaded)
        with self.lock:
            self.images.append(image)
        return image

    def pick(self, rng: random.Random, live: bool = False,
             uploaded: bool = False) -> Image | None:
        with self.lock:
            pool = [i for i in self.images if not i.lost and not (live and i.deleted)
                    and (i.uploaded or not uploaded)]
        return rng.choice(pool) if pool else None

    def close(self) -> None:
        for image in self.images:
            os.close(image.fd)
            os.close(image.src_fd)

    def fail(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)
        print(f"soak: {what}")

    def folder(self, visibility: str) -> Path:
        return self.mount / f"projects/{PROJECT}/{visibility}"

    def by_id(self, image: Image | str) -> Path:
        return self.mount / f"by-id/{image.id if isinstance(image, Image) else image}"

    # -- reads ------------------------------------------------------------------------

    def verify(self, image: Image, fd: int, offset: int, size: int, how: str) -> bool:
        """Read `size` bytes at `offset` through the mount; compare with the source."""
        want = os.pread(image.src_fd, size, offset)
        got = bytearray()
        while len(got) < size:
            try:
                piece = os.pread(fd, size - len(got), offset + len(got))
            except OSError as exc:
                self._read_failed(image, f"{how} read of {image.id} at {offset + len(got)}"
                                         f"+{size - len(got)}: {exc!r}", exc)
                return False
            if not piece:
                break
            got += piece
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                         min(len(got), len(want)))
            what = (f"{how} read of {image.id} ({image.size} bytes) at {offset}+{size}: got "
                    f"{len(got)} bytes, want {len(want)}, first difference at {offset + first}")
            with self.lock:
                self.mismatches.append(what)
            print(f"soak: MISMATCH {what}")
            return False
        with self.lock:
            self.tally.reads += 1
            self.tally.bytes_verified += len(got)
        return True

    def _read_failed(self, image: Image, what: str, exc: OSError) -> None:
        if image.deleted and exc.errno == errno.ENOENT:
            with self.lock:  # reported once per image; readers then leave it alone
                if image.lost:
                    return
                image.lost = True
                self.lost_after_rm.append(
                    f"{what}, {time.monotonic() - image.deleted_at:.1f}s after its rm")
            return
        self.fail(what)

    def open_for_pass(self, image: Image) -> tuple[int, bool]:
        """A fresh by-id fd, or the one opened before if the image was deleted since."""
        if not image.deleted:
            try:
                return os.open(self.by_id(image), os.O_RDONLY), True
            except FileNotFoundError:
                if not image.deleted:
                    raise
        return image.fd, False

    def sequential_reader(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            image = self.pick(rng)
            if image is None:
                self.stop.wait(0.1)
                continue
            fd, own = self.open_for_pass(image)
            try:
                drop_page_cache(fd)
                with self.lock:
                    self.tally.page_cache_drops += 1
                for offset in range(0, image.size, MiB):
                    if self.stop.is_set() or not self.verify(image, fd, offset, MiB, "seq"):
                        break
                else:
                    self.verify(image, fd, image.size, MiB, "seq-eof")  # nothing, no error
                    with self.lock:
                        self.tally.sequential_passes += 1
            finally:
                if own:
                    os.close(fd)

    def random_reader(self, seed: int) -> None:
        rng = random.Random(seed)
        reads = 0
        while not self.stop.is_set():
            image = self.pick(rng)
            if image is None:
                self.stop.wait(0.1)
                continue
            size = int(4 * KiB * 2 ** rng.uniform(0, 6))  # 4 KiB .. 256 KiB, log-uniform
            offset = rng.randrange(0, image.size)
            if rng.random() < 0.5:
                offset -= offset % (4 * KiB)  # page-aligned, as a VM's disk reads are
            self.verify(image, image.fd, offset, size, "random")
            reads += 1
            if reads % 64 == 0:
                drop_page_cache(image.fd)
                with self.lock:
                    self.tally.page_cache_drops += 1

    # -- uploads ----------------------------------------------------------------------

    def uploader(self, seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        while not self.stop.is_set():
            n += 1
            name = f"up{seed}-{n}.raw"
            source = make_file(self.work / name, rng.randrange(2, 12) * MiB +
                               rng.randrange(0, 64 * KiB), seed=seed * 1000 + n)
            target = self.mount / f"inbox/{PROJECT}/{name}"
            began = time.monotonic()
            with open(source, "rb") as src, open(target, "wb") as dst:
                while piece := src.read(MiB):
                    dst.write(piece)
            waited = run_cli("inbox", "wait", str(target), "--timeout", str(UPLOAD_TIMEOUT),
                             check=False, timeout=UPLOAD_TIMEOUT + 30)
            if waited.returncode != 0:
                self.fail(f"upload of {name}: inbox wait exited {waited.returncode}: "
                          f"{waited.stdout.strip()} {waited.stderr.strip()}")
                continue
            image_id = waited.stdout.strip()
            # Checked before the image joins the pool, where gestures may move it.
            if name not in os.listdir(self.folder("private")):
                self.fail(f"upload {image_id} is not listed as private/{name}")
            named = os.getxattr(self.by_id(image_id), "user.glance.name").decode()
            if named != image_name(name):  # the file name less its .raw (semantics.md)
                self.fail(f"upload {image_id} is named {named!r}, not {image_name(name)!r}")
            image = self.add(image_id, source, image_name(name), name, uploaded=True)
            for offset in range(0, image.size, MiB):  # all of it, through by-id
                if not self.verify(image, image.fd, offset, MiB, "upload"):
                    break
            with self.lock:
                self.tally.uploads += 1
                self.tally.upload_seconds.append(time.monotonic() - began)
            self.stop.wait(rng.uniform(0.5, 2.0))

    # -- gestures ---------------------------------------------------------------------

    def gesturer(self, seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        while not self.stop.wait(rng.uniform(0.2, 0.6)):
            n += 1
            kind = rng.choices(["setfattr", "rename", "visibility", "rm"], [4, 3, 2, 1])[0]
            with self.lock:
                live_uploads = sum(1 for i in self.images if i.uploaded and not i.deleted)
            if kind == "rm" and live_uploads < 3:
                continue  # keep some uploads for the other gestures and the readers
            image = self.pick(rng, live=True, uploaded=kind == "rm")
            if image is None:
                continue
            try:
                getattr(self, f"_{kind}")(image, n, rng)
            except OSError as exc:
                self.fail(f"{kind} of {image.id} ({image.visibility}/{image.file_name}): "
                          f"{exc!r}")
                continue
            with self.lock:
                self.tally.gestures[kind] = self.tally.gestures.get(kind, 0) + 1

    def _setfattr(self, image: Image, n: int, rng: random.Random) -> None:
        key, value = f"soak_{rng.randrange(5)}", f"v{n}"
        os.setxattr(self.folder(image.visibility) / image.file_name, f"user.glance.{key}",
                    value.encode())
        image.properties[key] = value
        got = os.getxattr(self.by_id(image), f"user.glance.{key}").decode()
        if got != value:
            self.fail(f"setfattr {key}={value} on {image.id}: getxattr answers {got!r}")

    def _rename(self, image: Image, n: int, rng: random.Random) -> None:
        new = f"{image.file_name.removesuffix('.raw').split('-r')[0]}-r{n}.raw"
        folder = self.folder(image.visibility)
        os.rename(folder / image.file_name, folder / new)
        old, image.file_name, image.name = image.file_name, new, new.removesuffix(".raw")
        listed = os.listdir(folder)
        if new not in listed or old in listed:
            self.fail(f"mv {old} {new} in {folder}: the folder lists {sorted(listed)}")
        named = os.getxattr(self.by_id(image), "user.glance.name").decode()
        if named != image.name:
            self.fail(f"mv {old} {new}: the image is named {named!r}")

    def _visibility(self, image: Image, n: int, rng: random.Random) -> None:
        old = image.visibility
        new = rng.choice([v for v in VISIBILITIES if v != old])
        os.rename(self.folder(old) / image.file_name, self.folder(new) / image.file_name)
        image.visibility = new
        if image.file_name in os.listdir(self.folder(old)) or \
                image.file_name not in os.listdir(self.folder(new)):
            self.fail(f"mv {image.file_name} from {old}/ to {new}/: the listings disagree")
        got = os.getxattr(self.by_id(image), "user.glance.visibility").decode()
        if got != new:
            self.fail(f"mv {image.file_name} from {old}/ to {new}/: visibility is {got!r}")
        named = os.getxattr(self.by_id(image), "user.glance.name").decode()
        if named != image.name:  # semantics.md: the name changes only if the file name does
            self.fail(f"mv {image.file_name} from {old}/ to {new}/ renamed image {image.id} "
                      f"from {image.name!r} to {named!r}")
            image.name = named  # reported once; the store check at the end expects this
        if new in ("public", "community") and \
                image.file_name not in os.listdir(self.mount / new):
            self.fail(f"mv {image.file_name} to {new}/: not in the top-level {new}/")

    def _rm(self, image: Image, n: int, rng: random.Random) -> None:
        folder = self.folder(image.visibility)
        image.deleted_at = time.monotonic()
        image.deleted = True  # first: readers opening it from now on expect ENOENT
        try:
            os.unlink(folder / image.file_name)
        except OSError:
            image.deleted = False
            raise
        if image.file_name in os.listdir(folder):
            self.fail(f"rm {image.file_name}: still listed in {folder}")
        began = time.monotonic()
        while self.by_id(image).exists():  # a cached dentry lives entry_timeout at most
            if time.monotonic() - began > 5:
                self.fail(f"rm {image.id}: by-id/{image.id} still there after 5s")
                break
            time.sleep(0.05)
        with self.lock:
            self.tally.by_id_lag = max(self.tally.by_id_lag, time.monotonic() - began)
        drop_page_cache(image.fd)  # the handle opened before reads on, from the daemon
        self.verify(image, image.fd, max(image.size - 300 * KiB, 0), 300 * KiB, "after-rm")

    # -- sampling ---------------------------------------------------------------------

    def sampler(self) -> None:
        pid = self.mount.process.pid
        while not self.stop.wait(0.5):
            rss, anon = rss_of(pid)
            began = time.monotonic()
            stats = self.mount.stats()
            latency = time.monotonic() - began
            with self.lock:
                self.stats_latency = max(self.stats_latency, latency)
                self.samples.append(Sample(time.monotonic() - self.started, rss, anon,
                                           stats["cache_bytes"], stats["cache_cap"]))

    def read_probe(self, path: Path) -> None:
        """malloc's figures from the daemon's probe thread, over the soak's clock."""
        for line in path.read_text().splitlines() if path.exists() else []:
            parts = line.split()
            if len(parts) == 3:  # a line cut short by the unmount has fewer
                at = float(parts[0]) - self.started
                if 0 <= at <= self.elapsed:
                    self.malloc.append((at, int(parts[1]), int(parts[2])))

    # -- the run ----------------------------------------------------------------------

    def run(self) -> None:
        workers = [("sampler", self.sampler, ()), ("gestures", self.gesturer, (7,))]
        workers += [(f"seq{i}", self.sequential_reader, (i,))
                    for i in range(SEQUENTIAL_READERS)]
        workers += [(f"random{i}", self.random_reader, (100 + i,))
                    for i in range(RANDOM_READERS)]
        workers += [(f"upload{i}", self.uploader, (i + 1,)) for i in range(UPLOADERS)]
        threads = [threading.Thread(target=self._guard, args=(name, fn, args), name=name,
                                    daemon=True) for name, fn, args in workers]
        self.started = time.monotonic()
        for thread in threads:
            thread.start()
        self.stop.wait(self.seconds)
        self.stop.set()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.1))
        self.elapsed = time.monotonic() - self.started
        hung = [t.name for t in threads if t.is_alive()]
        if hung:
            self.fail(f"workers still running {JOIN_TIMEOUT:g}s after the stop: {hung}")

    def _guard(self, name: str, fn, args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a worker's crash is a finding, reported whole
            self.fail(f"{name} died:\n{traceback.format_exc()}")
            self.stop.set()  # a dead worker fails the soak: do not wait out the clock


def drop_page_cache(fd: int) -> None:
    """Make the next reads of this file reach the daemon instead of the page cache."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def rss_of(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a process, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                values[key] = int(rest.split()[0]) * KiB
    return values["VmRSS"], values["RssAnon"]


@pytest.fixture(params=["file", "s3"] if LONG else ["s3"])
def soak_store(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return request.getfixturevalue(f"{request.param}_store")


def test_soak_readers_uploads_and_gestures_on_a_small_cache(soak_store, mount, tmp_path):
    store = soak_store
    began = time.monotonic()
    work = tmp_path / "sources"
    work.mkdir()
    sources = [make_file(work / f"soak{i}.raw", size * MiB + i * 4097, seed=500 + i)
               for i, size in enumerate(BASE_SIZES_MIB)]
    with ThreadPoolExecutor(2) as pool:  # two cores: hashing in one, uploading in another
        ids = list(pool.map(lambda i: store.create(sources[i], PROJECT, "--name", f"soak{i}"),
                            range(len(sources))))
    conf = tmp_path / "soak.toml"
    conf.write_text(f'cache_size = "{CACHE_SIZE}"\nmemory_cache = "{MEMORY_CACHE}"\n'
                    f'settle_time = 0.5\nprojects = ["{PROJECT}"]\n')
    probe = tmp_path / "malloc.log"
    m = mount(store, extra=("--config", str(conf)),
              prelude=f"PROBE_PATH = {str(probe)!r}\n{PROBE}")
    soak = Soak(m, work, SECONDS)
    try:
        for i, (image_id, source) in enumerate(zip(ids, sources, strict=True)):
            soak.add(image_id, source, f"soak{i}", f"soak{i}.raw", uploaded=False)
        working_set = sum(i.size for i in soak.images)
        assert working_set > 3 * CACHE_SIZE
        setup = time.monotonic() - began
        soak.run()
        soak.read_probe(probe)
        final = m.stats()
        report(soak, store.kind, setup, working_set, final)
        problems = check(soak, m, store, final)
    finally:
        soak.close()
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)


def check(soak: Soak, m, store, final: dict) -> list[str]:  # type: ignore[no-untyped-def]
    """Everything that went wrong, so one run reports all of it."""
    problems = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    t, samples = soak.tally, soak.samples
    expect(not soak.mismatches, f"{len(soak.mismatches)} reads returned wrong bytes, e.g.\n  "
           + "\n  ".join(soak.mismatches[:10]))
    expect(not soak.errors, f"{len(soak.errors)} errors, e.g.\n  " +
           "\n  ".join(soak.errors[:10]))
    expect(t.uploads >= UPLOADERS and t.sequential_passes >= SEQUENTIAL_READERS
           and t.reads > 1000 and sum(t.gestures.values()) >= 20,
           f"the soak did too little: {t}")
    expect(len(samples) >= soak.seconds, f"the sampler fell behind ({len(samples)} samples)")
    over = [s for s in samples if s.cache_bytes > s.cache_cap]
    expect(not over, f"the cache was over its cap at {len(over)} samples, e.g. {over[:3]}")
    expect(final["cache_bytes"] <= final["cache_cap"], f"final cache over its cap: {final}")
    expect(final["store_bytes"] > 2 * final["cache_cap"], "the cache never had to evict")
    for counter in ("corrupt_chunks", "damaged_cache_entries", "read_timeouts",
                    "store_timeouts", "stuck_threads", "abandoned_threads"):
        expect(final.get(counter, 0) == 0, f"{counter} = {final.get(counter)}")
    if samples:
        peak_rss, peak_anon = max(s.rss for s in samples), max(s.anon for s in samples)
        expect(peak_anon < RSS_ANON_BOUND, f"RssAnon peaked at {peak_anon / MiB:.0f} MiB "
               f"(bound {RSS_ANON_BOUND / MiB:.0f})")
        expect(peak_rss < RSS_BOUND, f"VmRSS peaked at {peak_rss / MiB:.0f} MiB "
               f"(bound {RSS_BOUND / MiB:.0f})")
        second, last = quarter_medians([s.anon for s in samples])
        expect(soak.elapsed < RSS_SETTLED or last - second < RSS_GROWTH_BOUND,
               f"RssAnon still growing in the second half: median {second / MiB:.0f} -> "
               f"{last / MiB:.0f} MiB")
    expect(len(soak.malloc) >= soak.seconds, "the daemon's malloc probe wrote "
           f"{len(soak.malloc)} samples")
    if soak.malloc:
        in_use = [used for _, used, _ in soak.malloc]
        expect(max(in_use) < IN_USE_BOUND, f"malloc in use peaked at "
               f"{max(in_use) / MiB:.0f} MiB (bound {IN_USE_BOUND / MiB:.0f})")
        half = int(statistics.median(in_use[len(in_use) // 2:]))
        expect(half < IN_USE_MEDIAN_BOUND, f"malloc in use over the second half: median "
               f"{half / MiB:.0f} MiB (bound {IN_USE_MEDIAN_BOUND / MiB:.0f})")
        second, last = quarter_medians(in_use)
        expect(last - second < IN_USE_GROWTH_BOUND, f"malloc in use still growing in the "
               f"second half: median {second / MiB:.0f} -> {last / MiB:.0f} MiB")
    # The daemon still answers, and shows what the gestures made.
    expect(m.process.poll() is None, "the daemon died")
    live = {i.id for i in soak.images if not i.deleted}
    listed = set(os.listdir(m / "by-id"))
    expect(listed == live, f"by-id/ lists {sorted(listed ^ live)} wrongly")
    for visibility in VISIBILITIES:
        want = {i.file_name for i in soak.images
                if not i.deleted and i.visibility == visibility}
        listed = set(os.listdir(soak.folder(visibility)))
        expect(listed == want, f"{visibility}/ lists {sorted(listed)}, not {sorted(want)}")
    # ... and so does the store: another host would see the same.
    shown = {d["id"]: d for d in json.loads(store.cli("image", "list", "--json").stdout)}
    for image in soak.images:
        doc = shown.get(image.id, {})
        if image.deleted:
            expect(doc.get("status", "pending_delete") == "pending_delete",
                   f"deleted image {image.id} is {doc.get('status')} in the store")
            continue
        got = {k: doc.get(k) for k in ("status", "name", "visibility", *image.properties)}
        want = {"status": "active", "name": image.name, "visibility": image.visibility,
                **image.properties}
        expect(got == want, f"image {image.id} in the store: {got}, not {want}")
    errors = [line for line in m.log().splitlines() if re.search(r" (ERROR|CRITICAL) ", line)]
    expect(not errors, "the daemon logged errors:\n  " + "\n  ".join(errors[:10]))
    expect(not soak.lost_after_rm, f"{len(soak.lost_after_rm)} deleted images became "
           "unreadable through handles opened before their rm (semantics.md: they read on "
           "to the end):\n  " + "\n  ".join(soak.lost_after_rm[:5]))
    return problems


def quarter_medians(values: list[int]) -> tuple[int, int]:
    """The medians of the second quarter of a series and of its last quarter."""
    quarter = max(len(values) // 4, 1)
    return (int(statistics.median(values[quarter:2 * quarter] or values)),
            int(statistics.median(values[3 * quarter:] or values)))


def report(soak: Soak, kind: str, setup: float, working_set: int, final: dict) -> None:
    t, samples, malloc = soak.tally, soak.samples, soak.malloc
    elapsed = max(soak.elapsed, 1e-9)
    deleted = sum(1 for i in soak.images if i.deleted)
    uploads = sorted(t.upload_seconds) or [0.0]
    print(f"\nsoak[{kind}]: {soak.elapsed:.0f}s after {setup:.0f}s of setup; working set "
          f"{working_set / MiB:.0f} MiB at the start, {len(soak.images)} images at the end "
          f"({deleted} deleted)")
    print(f"  reads {t.reads}, {t.bytes_verified / MiB:.0f} MiB verified "
          f"({t.bytes_verified / MiB / elapsed:.0f} MiB/s), {t.sequential_passes} "
          f"sequential passes, {t.page_cache_drops} page-cache drops")
    print(f"  uploads {t.uploads} (copy to published {uploads[0]:.1f}..{uploads[-1]:.1f}s), "
          f"gestures {dict(sorted(t.gestures.items()))}, by-id/<id> gone after rm within "
          f"{t.by_id_lag:.2f}s")
    if samples:
        second, last = quarter_medians([s.anon for s in samples])
        print(f"  daemon VmRSS peak {max(s.rss for s in samples) / MiB:.0f} MiB (bound "
              f"{RSS_BOUND / MiB:.0f}); RssAnon peak {max(s.anon for s in samples) / MiB:.0f}"
              f" MiB (bound {RSS_ANON_BOUND / MiB:.0f}), median {second / MiB:.0f} MiB in "
              f"the second quarter, {last / MiB:.0f} MiB in the last")
        print("  RssAnon MiB over time: " + " ".join(
            f"{s.t:.0f}s:{s.anon / MiB:.0f}" for s in tenths(samples)))
        print(f"  cache peak {max(s.cache_bytes for s in samples) / MiB:.1f} MiB, final "
              f"{final['cache_bytes'] / MiB:.1f} MiB of the {final['cache_cap'] / MiB:.0f} "
              f"MiB cap; stats answered within {soak.stats_latency:.2f}s")
    if malloc:
        in_use = [used for _, used, _ in malloc]
        second, last = quarter_medians(in_use)
        print(f"  malloc in use peak {max(in_use) / MiB:.0f} MiB (bound "
              f"{IN_USE_BOUND / MiB:.0f}); median over the second half "
              f"{statistics.median(in_use[len(in_use) // 2:]) / MiB:.0f} MiB (bound "
              f"{IN_USE_MEDIAN_BOUND / MiB:.0f}), {second / MiB:.0f} MiB in the second "
              f"quarter, {last / MiB:.0f} MiB in the last; free in glibc's heaps peak "
              f"{max(free for _, _, free in malloc) / MiB:.0f} MiB")
        print("  malloc in use/free MiB over time: " + " ".join(
            f"{at:.0f}s:{used / MiB:.0f}/{free / MiB:.0f}" for at, used, free in tenths(malloc)))
    print(f"  store: {final['store_bytes'] / MiB:.0f} MiB in {final['store_requests']} "
          f"requests (~{max(final['store_bytes'] - final['cache_bytes'], 0) / MiB:.0f} MiB "
          f"of it evicted since); lmdb hits {final['lmdb_hits']}, memory hits "
          f"{final['memory_hits']}")
    print(f"  errors {len(soak.errors)}, wrong reads {len(soak.mismatches)}, deleted images "
          f"unreadable through their old handles {len(soak.lost_after_rm)} of {deleted}")


def tenths(series: list) -> list:  # type: ignore[type-arg]
    """Eleven points of a series, from its start to its end."""
    return [series[min(len(series) - 1, len(series) * k // 10)] for k in range(11)]
