"""Faults between the daemon and a real S3 server, injected by tests/faultproxy.py.

Every fault mode is tried on cold reads, cached reads, inbox uploads and catalog
refreshes. The promise: the right bytes, or EIO within read_timeout; an upload retried
and published whole; a catalog that never loses an image to a bad answer; and no
restart needed once the store behaves again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import Mount, StoreHandle, make_file, run_cli
from faultproxy import Fault, FaultProxy

MiB = 1 << 20
CHUNK = MiB
READ_TIMEOUT = 3.0
DEADLINE = READ_TIMEOUT + 1.5  # what a caller may wait, with room for a loaded machine
SLOTS = 80  # chunks in the test image; each read test takes two (a cold one, a gap)


@dataclass
class Rig:
    store: StoreHandle  # direct to SeaweedFS: how the tests set things up
    proxy: FaultProxy
    mount: Mount  # through the proxy
    image_id: str
    data: bytes
    next_slot: int = 2

    @property
    def image(self) -> Path:
        return self.mount / f"by-id/{self.image_id}"

    def cold_offset(self) -> int:
        """A chunk no test has read yet (the one after it is left alone: prefetch)."""
        slot, self.next_slot = self.next_slot, self.next_slot + 2
        assert slot < SLOTS, "out of cold chunks: make the image bigger"
        return slot * CHUNK


def _config(path: Path) -> Path:
    path.write_text(f'read_timeout = {READ_TIMEOUT}\nrefresh_interval = 1.0\n'
                    'settle_time = 0.3\nchunk_size = "1M"\nprojects = ["acme"]\n'
                    '[s3]\npart_size = "5M"\n')
    return path


@pytest.fixture(scope="module")
def rig(s3_server, tmp_path_factory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("faults")
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.make_bucket(bucket)
    store = StoreHandle("s3", f"s3://{bucket}/imagefs", s3_server.environ(), s3_server, bucket)
    src = make_file(root / "image.raw", SLOTS * CHUNK, seed=81)
    image_id = store.create(src, "acme", "--name", "base")
    endpoint = urlsplit(s3_server.endpoint)
    with FaultProxy(endpoint.hostname, endpoint.port, seed=3) as proxy:
        via_proxy = StoreHandle("s3", store.url, {**store.env,
                                                  "AWS_ENDPOINT_URL": proxy.endpoint_url})
        mount = Mount(via_proxy, root, extra=("--config", str(_config(root / "c.toml"))))
        try:
            mount.start()
            rig = Rig(store, proxy, mount, image_id, src.read_bytes())
            assert _pread(rig.image, 0) == rig.data[:4096]  # block table and chunk 0 cached
            yield rig
        finally:
            proxy.clear()
            mount.stop()
            assert "Traceback" not in mount.log(), mount.log()


def _pread(path: Path, offset: int, size: int = 4096) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel's copy too
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _timed_read(rig: Rig, offset: int) -> tuple[bytes | int, float]:
    """(the bytes, or the errno) and how long the caller waited."""
    start = time.monotonic()
    try:
        result: bytes | int = _pread(rig.image, offset)
    except OSError as exc:
        result = exc.errno or 0
    return result, time.monotonic() - start


# mode, its parameters, and what a cold read gets while the fault lasts.
PERSISTENT = [
    ("delay", {"seconds": 0.3}, "bytes"),
    ("stall", {}, "EIO"),
    ("stall_body", {}, "EIO"),
    ("trickle", {"rate": 4096}, "EIO"),
    ("reset", {}, "EIO"),
    ("truncate", {}, "EIO"),
    ("flip", {}, "EIO"),
    ("status", {"status": 503}, "EIO"),
    ("status", {"status": 500}, "EIO"),
    ("refuse", {}, "EIO"),
]


def _fault(mode: str, params: dict, **match) -> Fault:  # type: ignore[type-arg]
    if mode == "refuse":
        return Fault("refuse", drop=True)
    return Fault(mode, **params, **match)


@pytest.mark.parametrize("mode, params, expect", PERSISTENT,
                         ids=[f"{m}-{p.get('status', '')}".rstrip("-") for m, p, _ in PERSISTENT])
def test_cold_reads_answer_in_time_and_recover(rig, mode, params, expect):
    offset = rig.cold_offset()
    fault = rig.proxy.add(_fault(mode, params, method="GET", ranged=True))
    try:
        result, waited = _timed_read(rig, offset)
    finally:
        rig.proxy.remove(fault)
    wanted = rig.data[offset:offset + 4096]
    if expect == "bytes":
        assert result == wanted
    else:
        assert result == errno.EIO, f"{mode}: expected EIO, got {result!r}"
    assert waited < DEADLINE, f"{mode}: the caller waited {waited:.1f}s"
    time.sleep(2.1)  # a chunk that just failed fails fast for 2 s (see reader.py)
    assert _pread(rig.image, offset) == wanted, f"{mode}: no recovery without a restart"


TRANSIENT = [("stall", {}), ("stall_body", {}), ("reset", {}), ("truncate", {}),
             ("flip", {}), ("status", {"status": 503}), ("status", {"status": 500})]


@pytest.mark.parametrize("mode, params", TRANSIENT,
                         ids=[f"{m}-{p.get('status', '')}".rstrip("-") for m, p in TRANSIENT])
def test_one_bad_answer_is_retried_within_the_deadline(rig, mode, params):
    offset = rig.cold_offset()
    fault = rig.proxy.add(Fault(mode, **params, method="GET", ranged=True, count=1))
    result, waited = _timed_read(rig, offset)
    assert fault.applied == 1
    assert result == rig.data[offset:offset + 4096]
    assert waited < DEADLINE


def test_refusal_that_ends_soon_is_ridden_out(rig):
    offset = rig.cold_offset()
    fault = rig.proxy.add(Fault("refuse", drop=True))
    threading.Timer(1.0, rig.proxy.remove, (fault,)).start()
    result, waited = _timed_read(rig, offset)
    assert result == rig.data[offset:offset + 4096] and waited < DEADLINE


@pytest.mark.parametrize("mode, params, _expect", PERSISTENT,
                         ids=[f"{m}-{p.get('status', '')}".rstrip("-") for m, p, _ in PERSISTENT])
def test_cached_data_is_served_whatever_the_store_does(rig, mode, params, _expect):
    offset = rig.cold_offset()
    assert _pread(rig.image, offset) == rig.data[offset:offset + 4096]
    before = rig.mount.stats()["store_requests"]
    fault = rig.proxy.add(_fault(mode, params))
    try:
        result, waited = _timed_read(rig, offset)
    finally:
        rig.proxy.remove(fault)
    assert result == rig.data[offset:offset + 4096]
    assert waited < 1.0, "a cached read waited on the store"
    assert rig.mount.stats()["store_requests"] == before


def test_many_readers_of_a_stalled_store_all_answer_in_time(rig):
    offsets = [rig.cold_offset() for _ in range(6)]
    fault = rig.proxy.add(Fault("stall", method="GET", ranged=True))
    results: dict[int, tuple[bytes | int, float]] = {}

    def reader(offset: int) -> None:
        results[offset] = _timed_read(rig, offset)

    threads = [threading.Thread(target=reader, args=(o,)) for o in offsets for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        rig.proxy.remove(fault)
    assert len(results) == len(offsets)
    for offset, (result, waited) in results.items():
        assert result == errno.EIO and waited < DEADLINE, (offset, result, waited)
    stats = rig.mount.stats()
    assert stats["store_timeouts"] >= 1 and stats["abandoned_threads"] >= 1, stats
    deadline = time.monotonic() + 10  # the stall is over: the abandoned threads return
    while rig.mount.stats()["stuck_threads"]:
        assert time.monotonic() < deadline, rig.mount.stats()
        time.sleep(0.2)


# -- uploads --------------------------------------------------------------------------

UPLOAD_FAULTS = [
    # (what, the rule) — each strikes the uploads of one inbox file, then stops.
    ("503 on puts", Fault("status", status=503, method="PUT", count=3)),
    ("body flipped on the way in", Fault("flip_request", method="PUT", count=2)),
    ("connection reset while sending", Fault("reset_request", method="PUT", count=2)),
    ("put stalls", Fault("stall", method="PUT", count=1)),
    ("manifest acknowledgement lost", Fault("truncate", method="PUT", match="/manifests/",
                                            count=1)),
    ("multipart commit answer cut", Fault("reset", method="POST", match="uploadId=",
                                          count=1)),
    ("multipart start refused", Fault("status", status=500, method="POST", match="uploads",
                                      count=2)),
]


@pytest.mark.parametrize("what, fault", UPLOAD_FAULTS, ids=[w for w, _ in UPLOAD_FAULTS])
def test_uploads_are_retried_and_published_whole(rig, tmp_path, what, fault):
    src = make_file(tmp_path / "up.raw", 12 * MiB, seed=zlib.crc32(what.encode()))
    name = f"up-{uuid.uuid4().hex[:6]}.raw"
    rig.proxy.add(fault)
    try:
        subprocess.run(["cp", str(src), str(rig.mount / f"inbox/acme/{name}")], check=True)
        waited = run_cli("inbox", "wait", str(rig.mount / f"inbox/acme/{name}"),
                         "--timeout", "120", check=False, timeout=150)
    finally:
        rig.proxy.remove(fault)
    assert waited.returncode == 0, (what, waited.stdout, waited.stderr, rig.mount.log()[-3000:])
    assert fault.applied >= 1, f"{what}: the fault never struck"
    image_id = waited.stdout.strip()
    stored = rig.store.read_object(f"data/{image_id}")
    assert hashlib.sha256(stored).digest() == hashlib.sha256(src.read_bytes()).digest()
    shown = json.loads(rig.store.cli("image", "show", image_id, "--json").stdout)
    assert shown["status"] == "active" and shown["size"] == 12 * MiB
    assert shown["checksum"] == hashlib.md5(src.read_bytes()).hexdigest()


# -- catalog refreshes ----------------------------------------------------------------

REFRESH_FAULTS = [
    ("listing 503", Fault("status", status=503, match="list-type=2")),
    ("listing stalls", Fault("stall", match="list-type=2")),
    ("listing cut", Fault("truncate", match="list-type=2")),
    ("listing bits flipped", Fault("flip", match="list-type=2", bits=8)),
    ("manifest bits flipped", Fault("flip", method="GET", match="/manifests/")),
    ("store refuses", Fault("refuse", drop=True)),
]


@pytest.mark.parametrize("what, fault", REFRESH_FAULTS, ids=[w for w, _ in REFRESH_FAULTS])
def test_refreshes_never_lose_images_and_catch_up(rig, tmp_path, what, fault):
    before = set(os.listdir(rig.mount / "by-id"))
    assert rig.image_id in before
    rig.proxy.add(fault)
    try:
        new_id = rig.store.create(make_file(tmp_path / "n.raw", 4096, seed=9), "acme",
                                  "--name", f"new-{uuid.uuid4().hex[:6]}")
        deadline = time.monotonic() + 4  # several refresh intervals under the fault
        while time.monotonic() < deadline:
            listed = set(os.listdir(rig.mount / "by-id"))
            assert before <= listed, f"{what}: images vanished: {before - listed}"
            time.sleep(0.2)
    finally:
        rig.proxy.remove(fault)
    deadline = time.monotonic() + 15
    while new_id not in os.listdir(rig.mount / "by-id"):
        assert time.monotonic() < deadline, f"{what}: the catalog did not catch up"
        time.sleep(0.2)
    name = os.getxattr(rig.mount / f"by-id/{new_id}", "user.glance.name").decode()
    assert name.startswith("new-"), f"{what}: a damaged manifest was believed: {name!r}"
